// strerrorname_np (glibc 2.32+) is declared only with _GNU_SOURCE, which must be
// defined before the first system header; Swift's Glibc module is built without it.
#define _GNU_SOURCE
#include <string.h>
#include "CSystemCalls.h"

const char *csystemcalls_errno_name(int errnum) {
    return strerrorname_np(errnum);
}
