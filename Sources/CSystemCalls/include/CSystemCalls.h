// CSystemCalls: glibc functions Swift's Glibc module hides behind _GNU_SOURCE.
// Only declarations of thin wrappers; the definitions are in CSystemCalls.c.
#ifndef CSYSTEMCALLS_H
#define CSYSTEMCALLS_H

/// The symbolic name of an errno value ("ENOENT"), from glibc's strerrorname_np;
/// NULL when glibc does not know the value.
const char *csystemcalls_errno_name(int errnum);

/// O_PATH: a descriptor that names a file without opening it for reading or writing
/// (no FIFO waits for a peer, no device is opened), for checking before opening.
int csystemcalls_o_path(void);

/// renameat2(..., RENAME_NOREPLACE): moves a name into place only if the new name does
/// not exist, atomically (EEXIST otherwise). Returns -1 with errno set on failure.
int csystemcalls_renameat_noreplace(int olddirfd, const char *oldpath, int newdirfd, const char *newpath);

/// ioctl(fd, TUNSETIFF) with IFF_TAP | IFF_NO_PI: attaches an open /dev/net/tun to the
/// existing tap `name` (frames without a packet-information prefix). Returns -1 with errno set.
int csystemcalls_tunsetiff_tap(int fd, const char *name);

/// setns(fd, CLONE_NEWNET): moves the calling thread into the network namespace `fd` names.
/// Returns -1 with errno set.
int csystemcalls_setns_net(int fd);

/// IFNAMSIZ: interface names are shorter than this (the terminating NUL included).
int csystemcalls_ifnamsiz(void);

#endif
