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

#include <errno.h>
#include <sched.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <linux/if_packet.h>
#include <linux/if_ether.h>
#include <arpa/inet.h>

int csystemcalls_tun_set_tap(int fd, const char *name, char *actual) {
    struct ifreq request;
    memset(&request, 0, sizeof request);
    if (strlen(name) >= IFNAMSIZ) { errno = ENAMETOOLONG; return -1; }
    strncpy(request.ifr_name, name, IFNAMSIZ - 1);
    request.ifr_flags = IFF_TAP | IFF_NO_PI;
    int result = ioctl(fd, TUNSETIFF, &request);
    if (result < 0) return -1;
    memcpy(actual, request.ifr_name, IFNAMSIZ);
    actual[IFNAMSIZ - 1] = 0;
    return result;
}

int csystemcalls_tun_get_flags(int fd, char *name) {
    struct ifreq request;
    memset(&request, 0, sizeof request);
    if (ioctl(fd, TUNGETIFF, &request) < 0) return -1;
    memcpy(name, request.ifr_name, IFNAMSIZ);
    name[IFNAMSIZ - 1] = 0;
    return request.ifr_flags & 0xffff;
}

int csystemcalls_tun_flag_tap(void) { return IFF_TAP; }
int csystemcalls_tun_flag_no_pi(void) { return IFF_NO_PI; }

int csystemcalls_interface_index(const char *name) {
    unsigned int index = if_nametoindex(name);
    if (index == 0) return -1;
    return index > 0x7fffffff ? 0x7fffffff : (int)index;
}

int csystemcalls_setns_net(int fd) {
    return setns(fd, CLONE_NEWNET);
}

int csystemcalls_packet_socket(const char *name) {
    unsigned int index = if_nametoindex(name);
    if (index == 0) return -1;
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));
    if (fd < 0) return -1;
    struct sockaddr_ll address;
    memset(&address, 0, sizeof address);
    address.sll_family = AF_PACKET;
    address.sll_protocol = htons(ETH_P_ALL);
    address.sll_ifindex = (int)index;
    if (bind(fd, (struct sockaddr *)&address, sizeof address) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
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

int csystemcalls_name_this_thread(const char *name)
{
    return pthread_setname_np(pthread_self(), name);
}
