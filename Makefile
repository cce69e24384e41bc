# Two commands on a fresh Debian machine:
#   make demo   builds everything and boots the guests
#   make test   runs the tests on /dev/kvm
SWIFT   ?= swift
RELEASE := .build/release/vmm
DEBUG   := .build/debug/vmm

.PHONY: all deps guests build release test demo bench clean

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

clean:
	$(MAKE) -C GuestImages clean
	rm -rf .build bench-results
