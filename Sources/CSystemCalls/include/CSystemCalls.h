// CSystemCalls: glibc functions Swift's Glibc module hides behind _GNU_SOURCE.
// Only declarations of thin wrappers; the definitions are in CSystemCalls.c.
#ifndef CSYSTEMCALLS_H
#define CSYSTEMCALLS_H

/// The symbolic name of an errno value ("ENOENT"), from glibc's strerrorname_np;
/// NULL when glibc does not know the value.
const char *csystemcalls_errno_name(int errnum);

#endif
