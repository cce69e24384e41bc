// strerrorname_np (glibc 2.32+) is declared only with _GNU_SOURCE, which must be
// defined before the first system header; Swift's Glibc module is built without it.
#define _GNU_SOURCE
#include <string.h>
#include <fcntl.h>
#include <stdio.h>
#include <stddef.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>
#include "CSystemCalls.h"

const char *csystemcalls_errno_name(int errnum) {
    return strerrorname_np(errnum);
}

int csystemcalls_o_path(void) {
    return O_PATH;
}

int csystemcalls_renameat_noreplace(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
    return renameat2(olddirfd, oldpath, newdirfd, newpath, RENAME_NOREPLACE);
}

int csystemcalls_userfaultfd(int flags) {
    return (int)syscall(SYS_userfaultfd, flags);
}

int csystemcalls_ioctl_pointer(int fd, unsigned long request, void *argument) {
    return ioctl(fd, request, argument);
}

unsigned long csystemcalls_uffdio_api(void) { return UFFDIO_API; }
unsigned long csystemcalls_uffdio_register(void) { return UFFDIO_REGISTER; }
unsigned long csystemcalls_uffdio_unregister(void) { return UFFDIO_UNREGISTER; }
unsigned long csystemcalls_uffdio_copy(void) { return UFFDIO_COPY; }
unsigned long csystemcalls_uffdio_zeropage(void) { return UFFDIO_ZEROPAGE; }
unsigned long csystemcalls_uffdio_wake(void) { return UFFDIO_WAKE; }
unsigned long long csystemcalls_uffd_api_version(void) { return UFFD_API; }
unsigned long long csystemcalls_uffdio_register_mode_missing(void) { return UFFDIO_REGISTER_MODE_MISSING; }
int csystemcalls_uffdio_copy_bit(void) { return _UFFDIO_COPY; }
int csystemcalls_uffdio_zeropage_bit(void) { return _UFFDIO_ZEROPAGE; }
unsigned char csystemcalls_uffd_event_pagefault(void) { return UFFD_EVENT_PAGEFAULT; }
unsigned long long csystemcalls_uffd_pagefault_flag_write(void) { return UFFD_PAGEFAULT_FLAG_WRITE; }
int csystemcalls_uffd_msg_size(void) { return (int)sizeof(struct uffd_msg); }
int csystemcalls_uffd_msg_pagefault_flags_offset(void) { return (int)offsetof(struct uffd_msg, arg.pagefault.flags); }
int csystemcalls_uffd_msg_pagefault_address_offset(void) { return (int)offsetof(struct uffd_msg, arg.pagefault.address); }
