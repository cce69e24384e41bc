// CSystemCalls: glibc functions Swift's Glibc module hides behind _GNU_SOURCE.
// Only declarations of thin wrappers; the definitions are in CSystemCalls.c.
#ifndef CSYSTEMCALLS_H
#define CSYSTEMCALLS_H

// The ioctl argument structs (uffdio_api, uffdio_register, uffdio_copy, ...), for Swift.
#include <linux/userfaultfd.h>

/// The symbolic name of an errno value ("ENOENT"), from glibc's strerrorname_np;
/// NULL when glibc does not know the value.
const char *csystemcalls_errno_name(int errnum);

/// O_PATH: a descriptor that names a file without opening it for reading or writing
/// (no FIFO waits for a peer, no device is opened), for checking before opening.
int csystemcalls_o_path(void);

/// renameat2(..., RENAME_NOREPLACE): moves a name into place only if the new name does
/// not exist, atomically (EEXIST otherwise). Returns -1 with errno set on failure.
int csystemcalls_renameat_noreplace(int olddirfd, const char *oldpath, int newdirfd, const char *newpath);

/// TUNSETIFF with IFF_TAP | IFF_NO_PI on an open /dev/net/tun: attaches `fd` to the tap
/// interface `name` (the kernel creates it if absent, in the calling thread's network
/// namespace; `TapDevice` checks first that it exists). The kernel's name for it (at most 15
/// bytes and a NUL) goes to `actual` (16 bytes). Returns -1 with errno set on failure (a name
/// of 16 bytes or more: ENAMETOOLONG; an interface of that name that is not such a tap:
/// EINVAL; a tap another process has attached: EBUSY).
int csystemcalls_tun_set_tap(int fd, const char *name, char *actual);

/// TUNGETIFF on an attached /dev/net/tun descriptor: the interface's flags (IFF_TAP,
/// IFF_NO_PI, IFF_PERSIST, ...), and its name into `name` (16 bytes). -1 with errno set.
int csystemcalls_tun_get_flags(int fd, char *name);

/// <linux/if_tun.h>'s IFF_TAP and IFF_NO_PI (that header is included only by the C file).
int csystemcalls_tun_flag_tap(void);
int csystemcalls_tun_flag_no_pi(void);

/// if_nametoindex(3): the index of interface `name` in the calling thread's network namespace,
/// or -1 with errno set (no such interface: ENODEV).
int csystemcalls_interface_index(const char *name);

/// setns(fd, CLONE_NEWNET): moves the calling thread into the network namespace `fd` names.
int csystemcalls_setns_net(int fd);

/// An AF_PACKET raw socket (ETH_P_ALL, close-on-exec) bound to interface `name` of the calling
/// thread's network namespace: every frame the interface sends or receives. -1 with errno set
/// on failure (an unknown interface: ENODEV).
int csystemcalls_packet_socket(const char *name);
/// userfaultfd(2) with `flags` (O_CLOEXEC, O_NONBLOCK): glibc has no wrapper. Returns -1 with
/// errno set on failure.
int csystemcalls_userfaultfd(int flags);

/// ioctl(2) with one pointer argument (Swift cannot call the variadic one). -1 with errno set.
int csystemcalls_ioctl_pointer(int fd, unsigned long request, void *argument);

/// <linux/userfaultfd.h>'s values, which are macros Swift cannot import (_IOWR and shifts).
unsigned long csystemcalls_uffdio_api(void);
unsigned long csystemcalls_uffdio_register(void);
unsigned long csystemcalls_uffdio_unregister(void);
unsigned long csystemcalls_uffdio_copy(void);
unsigned long csystemcalls_uffdio_zeropage(void);
unsigned long csystemcalls_uffdio_wake(void);
unsigned long long csystemcalls_uffd_api_version(void);
unsigned long long csystemcalls_uffdio_register_mode_missing(void);
/// Bit numbers of the ioctls UFFDIO_REGISTER reports as usable on a range.
int csystemcalls_uffdio_copy_bit(void);
int csystemcalls_uffdio_zeropage_bit(void);
unsigned char csystemcalls_uffd_event_pagefault(void);
unsigned long long csystemcalls_uffd_pagefault_flag_write(void);
/// Bytes in one struct uffd_msg, and the offsets of the fields a page fault uses.
int csystemcalls_uffd_msg_size(void);
int csystemcalls_uffd_msg_pagefault_flags_offset(void);
int csystemcalls_uffd_msg_pagefault_address_offset(void);

/// pthread_setname_np on the calling thread: the name the kernel shows for it
/// (/proc/PID/task/TID/comm), at most 15 bytes. Returns 0 or an errno value.
int csystemcalls_name_this_thread(const char *name);

#endif
