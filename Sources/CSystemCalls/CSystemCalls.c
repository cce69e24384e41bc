// strerrorname_np (glibc 2.32+) is declared only with _GNU_SOURCE, which must be
// defined before the first system header; Swift's Glibc module is built without it.
#define _GNU_SOURCE
#include <string.h>
#include <fcntl.h>
#include <stdio.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <net/if.h>
#include <linux/if_tun.h>
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

int csystemcalls_tunsetiff_tap(int fd, const char *name) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    return ioctl(fd, TUNSETIFF, &ifr);
}

int csystemcalls_ifnamsiz(void) {
    return IFNAMSIZ;
}

int csystemcalls_setns_net(int fd) {
    return setns(fd, CLONE_NEWNET);
}
