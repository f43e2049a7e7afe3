"""Build ``shifter_core._syscalls``: the Linux system calls the runtime needs (cffi API mode).

Python 3.11's :mod:`os` has no ``mount``, ``unshare``, ``setns``, ``pivot_root``, ``prctl``,
the new mount API (``open_tree``, ``move_mount``, ``mount_setattr``) or the loop-device
ioctls. This module compiles thin C wrappers for them; the Python side
(:mod:`shifter_core.syscalls`) turns failures into exceptions naming the call, the path and
errno. Built by ``pip install -e .`` (``cffi_modules`` in ``setup.py``) or by hand::

    .venv/bin/python cffi_build/build_syscalls.py     # writes src/shifter_core/_syscalls*.so
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import cffi

CDEF = """
/* libc */
int mount(const char *source, const char *target, const char *fstype,
          unsigned long flags, const void *data);
int umount2(const char *target, int flags);
int unshare(int flags);
int setns(int fd, int nstype);
int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
          unsigned long arg5);

/* helpers written below (raw syscalls and ioctls) */
int sh_pivot_root(const char *new_root, const char *put_old);
int sh_mount_setattr(int dfd, const char *path, unsigned int flags, uint64_t attr_set,
                     uint64_t attr_clr, uint64_t propagation);
int sh_open_tree(int dfd, const char *path, unsigned int flags);
int sh_move_mount(int from_dfd, const char *from_path, int to_dfd, const char *to_path,
                  unsigned int flags);
int sh_openat2(int dfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve);
int sh_loop_ctl_get_free(int ctl_fd);
int sh_loop_configure(int loop_fd, int backing_fd, uint32_t flags, const char *name);
int sh_capset_clear(void);
int sh_capget(uint64_t *effective, uint64_t *permitted, uint64_t *inheritable);
int sh_clone_userns(unsigned int uid, unsigned int gid, char *stack, size_t stack_size);

#define MS_RDONLY ...
#define MS_NOSUID ...
#define MS_NODEV ...
#define MS_NOEXEC ...
#define MS_REMOUNT ...
#define MS_BIND ...
#define MS_MOVE ...
#define MS_REC ...
#define MS_PRIVATE ...
#define MS_SLAVE ...
#define MS_SHARED ...
#define MS_RELATIME ...
#define MS_SILENT ...
#define MNT_FORCE ...
#define MNT_DETACH ...
#define UMOUNT_NOFOLLOW ...
#define CLONE_NEWNS ...
#define CLONE_NEWUSER ...
#define CLONE_NEWPID ...
#define CLONE_NEWUTS ...
#define CLONE_NEWIPC ...
#define CLONE_NEWNET ...
#define PR_SET_NO_NEW_PRIVS ...
#define PR_GET_NO_NEW_PRIVS ...
#define PR_CAPBSET_DROP ...
#define PR_CAPBSET_READ ...
#define PR_CAP_AMBIENT ...
#define PR_CAP_AMBIENT_CLEAR_ALL ...
#define PR_SET_PDEATHSIG ...
#define PR_SET_DUMPABLE ...
#define PR_GET_DUMPABLE ...
#define PR_SET_CHILD_SUBREAPER ...
#define LO_FLAGS_READ_ONLY ...
#define LO_FLAGS_AUTOCLEAR ...
#define LO_FLAGS_DIRECT_IO ...
#define MOUNT_ATTR_RDONLY ...
#define MOUNT_ATTR_NOSUID ...
#define MOUNT_ATTR_NODEV ...
#define MOUNT_ATTR_NOEXEC ...
#define AT_RECURSIVE ...
#define OPEN_TREE_CLONE ...
#define OPEN_TREE_CLOEXEC ...
#define MOVE_MOUNT_F_EMPTY_PATH ...
#define MOVE_MOUNT_T_EMPTY_PATH ...
#define AT_SYMLINK_NOFOLLOW ...
#define AT_EMPTY_PATH ...
#define RESOLVE_NO_XDEV ...
#define RESOLVE_NO_MAGICLINKS ...
#define RESOLVE_NO_SYMLINKS ...
#define RESOLVE_BENEATH ...
#define RESOLVE_IN_ROOT ...
"""

SOURCE = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/loop.h>
#include <linux/mount.h>
#include <linux/openat2.h>

#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
/* The new mount API (Linux 5.2); the same numbers on every architecture. */
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef OPEN_TREE_CLOEXEC
#define OPEN_TREE_CLOEXEC O_CLOEXEC
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#endif
#ifndef MOVE_MOUNT_T_EMPTY_PATH
#define MOVE_MOUNT_T_EMPTY_PATH 0x00000040
#endif

int sh_pivot_root(const char *new_root, const char *put_old)
{
    return (int)syscall(SYS_pivot_root, new_root, put_old);
}

int sh_mount_setattr(int dfd, const char *path, unsigned int flags, uint64_t attr_set,
                     uint64_t attr_clr, uint64_t propagation)
{
    struct mount_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.attr_set = attr_set;
    attr.attr_clr = attr_clr;
    attr.propagation = propagation;
    return (int)syscall(SYS_mount_setattr, dfd, path, flags, &attr, sizeof attr);
}

int sh_open_tree(int dfd, const char *path, unsigned int flags)
{
    return (int)syscall(SYS_open_tree, dfd, path, flags);
}

int sh_move_mount(int from_dfd, const char *from_path, int to_dfd, const char *to_path,
                  unsigned int flags)
{
    return (int)syscall(SYS_move_mount, from_dfd, from_path, to_dfd, to_path, flags);
}

int sh_openat2(int dfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve)
{
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = flags;
    how.mode = mode;
    how.resolve = resolve;
    return (int)syscall(SYS_openat2, dfd, path, &how, sizeof how);
}

int sh_loop_ctl_get_free(int ctl_fd)
{
    return ioctl(ctl_fd, LOOP_CTL_GET_FREE);
}

int sh_loop_configure(int loop_fd, int backing_fd, uint32_t flags, const char *name)
{
    struct loop_config config;
    memset(&config, 0, sizeof config);
    config.fd = (uint32_t)backing_fd;
    config.info.lo_flags = flags;
    if (name)
        strncpy((char *)config.info.lo_file_name, name, LO_NAME_SIZE - 1);
    return ioctl(loop_fd, LOOP_CONFIGURE, &config);
}

int sh_capset_clear(void)
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    return (int)syscall(SYS_capset, &header, data);
}

int sh_capget(uint64_t *effective, uint64_t *permitted, uint64_t *inheritable)
{
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capget, &header, data) < 0)
        return -1;
    *effective = ((uint64_t)data[1].effective << 32) | data[0].effective;
    *permitted = ((uint64_t)data[1].permitted << 32) | data[0].permitted;
    *inheritable = ((uint64_t)data[1].inheritable << 32) | data[0].inheritable;
    return 0;
}

/* A user namespace owned by another user, made by root without fork (a fork of the prolog
 * copies its page tables: ~5 ms). The calling thread takes the user's euid and egid (real and
 * saved ids stay root's, so it can take them back), clones a child into a new user namespace
 * (owned by that euid) sharing its memory (CLONE_VM, no copy) on the caller's ``stack``, and
 * becomes root again. The child only waits (all signals blocked, killed with its parent) until
 * the caller, who writes its uid_map and gid_map, kills it with SIGKILL and reaps it; the stack
 * must stay allocated until then. The memory is root's: the caller must keep it non-dumpable
 * while the child lives (done here after each change of ids, which resets dumpability) and
 * must not use this where fs.suid_dumpable is 1. */
static int sh_userns_idle(void *arg)
{
    long parent = (long)arg;
    /* Raw system calls only: the child shares the caller's memory and thread pointer. */
    syscall(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (syscall(SYS_getppid) != parent)
        syscall(SYS_exit, 0);
    for (;;)
        syscall(SYS_ppoll, NULL, 0, NULL, NULL, 0);
    return 0;
}

int sh_clone_userns(unsigned int uid, unsigned int gid, char *stack, size_t stack_size)
{
    uid_t ruid, euid, suid;
    gid_t rgid, egid, sgid;
    sigset_t all, old;
    long pid = -1;
    int err = 0;
    char *top = (char *)(((uintptr_t)(stack + stack_size)) & ~(uintptr_t)15);

    if (getresuid(&ruid, &euid, &suid) < 0 || getresgid(&rgid, &egid, &sgid) < 0)
        return -1;
    if (euid != 0) {
        errno = EPERM;
        return -1;
    }
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    /* Raw system calls: this thread only (glibc's setresuid would change every thread). */
    if (syscall(SYS_setresgid, -1, gid, -1) < 0) {
        err = errno;
        goto out;
    }
    if (syscall(SYS_setresuid, -1, uid, -1) < 0) {
        err = errno;
        goto restore_gid;
    }
    syscall(SYS_prctl, PR_SET_DUMPABLE, 0, 0, 0, 0);
    pid = clone(sh_userns_idle, top, CLONE_VM | CLONE_NEWUSER | SIGCHLD,
                (void *)(long)getpid());
    if (pid < 0)
        err = errno;
    if (syscall(SYS_setresuid, -1, euid, -1) < 0)
        abort(); /* cannot happen: the real and saved uids are root's */
restore_gid:
    if (syscall(SYS_setresgid, -1, egid, -1) < 0)
        abort();
    syscall(SYS_prctl, PR_SET_DUMPABLE, 0, 0, 0, 0);
out:
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        errno = err;
        return -1;
    }
    return (int)pid;
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("shifter_core._syscalls", SOURCE)

if __name__ == "__main__":
    package = Path(__file__).resolve().parent.parent / "src" / "shifter_core"
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(ffibuilder.compile(tmpdir=tmp, verbose=False))
        # Copied, then renamed over the old module: running processes keep the old file.
        partial = package / f".{built.name}.partial"
        shutil.copy2(built, partial)
        partial.replace(package / built.name)
        print(package / built.name)
