# Two commands on a fresh Debian machine:
#   make demo   builds everything and boots the guests
#   make test   runs the tests on /dev/kvm
SWIFT   ?= swift
RELEASE := .build/release/vmm
DEBUG   := .build/debug/vmm

.PHONY: all deps guests build release test demo bench bench-migration bench-readme fuzz fuzz-api soak clean

all: build

deps:
	@bash scripts/install-deps.sh

guests: deps
	$(MAKE) -C GuestImages
	@bash scripts/fetch-tboot.sh

build: guests
	$(SWIFT) build

release: guests
	$(SWIFT) build -c release

test: build
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

demo: release
	@bash scripts/demo.sh $(RELEASE)

bench: release
	$(RELEASE) bench boot --runs 30 --output bench-results/boot.json
	$(RELEASE) bench snapshot --runs 3 --output bench-results/snapshot.json
	$(RELEASE) bench dirty-log --output bench-results/dirty-log.json
	$(RELEASE) bench ghost --runs 10 --output bench-results/ghost.json

# Live migration against QEMU on the same guest, one system at a time (see bench/README.md for
# how long). QUICK=1: the everyday subset (idle, 64 MiB at 20k pages/s, the hot sweep; one run
# each at 300 ms, ours against QEMU; about 2 minutes).
bench-migration: release
	python3 bench/migration_bench.py --vmm $(RELEASE) --out-dir bench-results $(if $(filter 1,$(QUICK)),--quick)

# The README's migration table, regenerated from a result file (default: the last
# `make bench-migration`; BENCH_JSON=docs/bench/migration.json for the published one).
BENCH_JSON ?= bench-results/migration.json
bench-readme:
	python3 bench/readme_table.py $(BENCH_JSON) README.md

# The snapshot decoder's mutation fuzzer, for FUZZ_SECONDS (default 60).
FUZZ_SECONDS ?= 60
fuzz: build
	SNAPSHOT_FUZZ_SECONDS=$(FUZZ_SECONDS) $(SWIFT) test --filter mutationFuzz

# schemathesis against the control API of a live VMM (installs socat and, from PyPI, schemathesis;
# not part of `make test`). FUZZ_API_EXAMPLES cases per operation and phase (default 100).
fuzz-api: build
	@bash scripts/fuzz-api.sh $(DEBUG)

# kill -9 of either side at random moments of a migration, SOAK_ROUNDS times (default 50).
SOAK_ROUNDS ?= 50
soak: build
	$(SWIFT) build --build-tests
	KILL_SOAK_ROUNDS=$(SOAK_ROUNDS) $(SWIFT) test --skip-build --filter KillDuringMigrationTests

clean:
	$(MAKE) -C GuestImages clean
	rm -rf .build bench-results
