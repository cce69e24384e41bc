// strerrorname_np (glibc 2.32+) is declared only with _GNU_SOURCE, which must be
// defined before the first system header; Swift's Glibc module is built without it.
#define _GNU_SOURCE
#include <string.h>
#include <fcntl.h>
#include <stdio.h>
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
