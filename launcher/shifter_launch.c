/*
 * shifter: the fast front end of the unprivileged runtime.
 *
 * Python decides everything (src/shifter_core/runtime/launch.py): after it has built a
 * container for a request, it leaves a *recipe* in the user's launch cache: the container's
 * generated files and mount points (a directory, "upper"), the list of mounts in order, the
 * environment changes and the files the result depends on.  When the same request comes
 * again (same options, user, groups and configuration, and none of those files changed),
 * this program replays the recipe without starting Python: it mounts the image, served by
 * a process of its own with libsquashfuse (what squashfuse_ll runs), stacks "upper" over it as a read-only overlay, makes the same mounts,
 * pivots into the root, drops every capability and execs the command.  Anything it does not
 * recognise (an unknown option, no recipe, a changed file, a Slurm job, an error before the
 * namespaces exist) hands the whole command line to the Python implementation, unchanged.
 *
 * Nothing here is privileged: the process maps only its own uid and gid into a new user
 * namespace, exactly as the Python path does, so a recipe can do nothing its user could not.
 * Every mount is nosuid and nodev (except device nodes bound into /dev); the root is
 * read-only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FUSE_USE_VERSION 32
#include <fuse3/fuse_lowlevel.h>
#include <squashfuse/ll.h>

#ifndef SHIFTER_PYTHON
#error "build with -DSHIFTER_PYTHON=\"/path/to/python\" (make launcher)"
#endif

#define RECIPE_MAGIC "shifter-launch-recipe-1"
#define SERVER_NAME "shifter-sqfs" /* the image server's name in ps */
#define EXIT_FAILED 125
#define MAX_MOUNTS 256
#define MAX_FIELDS 4096

#ifndef OPEN_TREE_CLONE
#define OPEN_TREE_CLONE 1
#endif
#ifndef OPEN_TREE_CLOEXEC
#define OPEN_TREE_CLOEXEC O_CLOEXEC
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef MOVE_MOUNT_F_EMPTY_PATH
#define MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#endif
#ifndef MOVE_MOUNT_T_EMPTY_PATH
#define MOVE_MOUNT_T_EMPTY_PATH 0x00000040
#endif
#ifndef MOUNT_ATTR_RDONLY
#define MOUNT_ATTR_RDONLY 0x00000001
#define MOUNT_ATTR_NOSUID 0x00000002
#define MOUNT_ATTR_NODEV 0x00000004
#define MOUNT_ATTR_NOEXEC 0x00000008
#endif
#ifndef SYS_open_tree
#define SYS_open_tree 428
#endif
#ifndef SYS_move_mount
#define SYS_move_mount 429
#endif
#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
#ifndef SYS_openat2
#define SYS_openat2 437
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

struct mount_attr_arg {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};
struct open_how_arg {
    uint64_t flags, mode, resolve;
};
#define RESOLVE_NO_MAGICLINKS 0x02
#define RESOLVE_NO_SYMLINKS 0x04
#define RESOLVE_BENEATH 0x08

extern char **environ;
static char **original_argv;
/* The recipe being replayed: a replay that fails removes it (where the path still resolves),
 * so the next run goes through Python, which says what is wrong or writes a recipe that
 * works. */
static char recipe_path[3300];

/* ---- falling back to Python ------------------------------------------------------------ */

/* Hand the command line to the Python implementation (which explains any problem itself).
 * ``miss`` tells it to leave a recipe for next time. */
static void fallback(const char *why, const char *key_hex)
{
    int argc = 0;
    while (original_argv[argc])
        argc++;
    char **argv = calloc(argc + 4, sizeof *argv);
    if (!argv)
        _exit(EXIT_FAILED);
    argv[0] = SHIFTER_PYTHON;
    argv[1] = "-m";
    argv[2] = "shifter_core.cli.shifter";
    for (int i = 1; i < argc; i++)
        argv[i + 2] = original_argv[i];
    if (key_hex)
        setenv("SHIFTER_LAUNCH_MISS", key_hex, 1);
    /* Python would set LC_CTYPE=C.UTF-8 in the environment the container inherits when the
     * caller has no locale (PEP 538); the Python side removes this variable again. */
    if (!getenv("PYTHONCOERCECLOCALE")) {
        setenv("PYTHONCOERCECLOCALE", "0", 1);
        setenv("SHIFTER_LAUNCH_UNSET", "PYTHONCOERCECLOCALE", 1);
    }
    if (getenv("SHIFTER_LAUNCH_DEBUG"))
        fprintf(stderr, "shifter: launcher: %s: running the Python runtime\n", why);
    execv(SHIFTER_PYTHON, argv);
    fprintf(stderr, "shifter: cannot run %s: %s\n", SHIFTER_PYTHON, strerror(errno));
    _exit(EXIT_FAILED);
}

/* A failure after the namespaces exist: nothing to fall back to (the caller's mounts are
 * untouched; ours go away with the process). */
static void die(const char *fmt, ...)
{
    va_list ap;
    int saved = errno;
    fputs("shifter: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (saved)
        fprintf(stderr, ": %s", strerror(saved));
    fputc('\n', stderr);
    if (recipe_path[0])
        unlink(recipe_path);
    _exit(EXIT_FAILED);
}

/* ---- the command line (the same rules as shifter_core.cli.shifter.parse_args) ---------- */

/* 'r': needs a value, 'o': optional value (only as --x=V or -xV), 'n': none */
static char long_kind(const char *name, size_t len)
{
    static const struct {
        const char *name;
        char kind;
    } table[] = {
        {"image", 'r'},    {"volume", 'r'},   {"entrypoint", 'o'},     {"workdir", 'o'},
        {"env", 'r'},      {"env-file", 'r'}, {"clearenv", 'n'},       {"module", 'r'},
        {"verbose", 'n'},  {"help", 'n'},     {"writable-tmpfs", 'n'},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strlen(table[i].name) == len && memcmp(table[i].name, name, len) == 0)
            return table[i].kind;
    return 0;
}

static char short_kind(char letter)
{
    switch (letter) {
    case 'V': case 'e': case 'm': return 'r';
    case 'w': return 'o';
    case 'E': case 'v': case 'h': return 'n';
    default: return 0;
    }
}

/* Index of the command in argv (options are argv[1..index-1]), or -1 when the line is not
 * well formed (Python says why). */
static int command_index(int argc, char **argv)
{
    int i = 1;
    while (i < argc) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0)
            return i + 1;
        if (strncmp(arg, "--", 2) == 0) {
            const char *eq = strchr(arg + 2, '=');
            size_t len = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
            char kind = long_kind(arg + 2, len);
            if (!kind || (kind == 'n' && eq))
                return -1;
            if (kind == 'r' && !eq && ++i >= argc)
                return -1;
            i++;
            continue;
        }
        if (arg[0] == '-' && arg[1]) {
            for (const char *p = arg + 1; *p; p++) {
                char kind = short_kind(*p);
                if (!kind)
                    return -1;
                if (kind == 'n')
                    continue;
                if (kind == 'r' && !p[1] && ++i >= argc)
                    return -1;
                break;
            }
            i++;
            continue;
        }
        break;
    }
    return i;
}

/* ---- the cache key ----------------------------------------------------------------------- */

struct buf {
    char *data;
    size_t len, cap;
};

static void buf_add(struct buf *b, const void *data, size_t len)
{
    if (b->len + len + 1 > b->cap) {
        b->cap = (b->len + len + 1) * 2;
        b->data = realloc(b->data, b->cap);
        if (!b->data)
            _exit(EXIT_FAILED);
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = 0;
}

static void buf_field(struct buf *b, const char *text)
{
    buf_add(b, text, strlen(text));
    buf_add(b, "\n", 1);
}

static int compare_gids(const void *a, const void *b)
{
    gid_t x = *(const gid_t *)a, y = *(const gid_t *)b;
    return x < y ? -1 : x > y;
}

/* The key names everything the recipe was made from that is not checked by file status:
 * the user, their groups, the configuration file's name and the options.  Fields are
 * separated by newlines; options are written with their length, so no option can forge
 * a field.  The same text is made by shifter_core.runtime.launch.launch_key. */
static void make_key(struct buf *key, int argc_options, char **options)
{
    char number[64];
    static gid_t groups[NGROUPS_MAX];
    int count = getgroups(NGROUPS_MAX, groups);
    if (count < 0)
        count = 0;
    qsort(groups, count, sizeof groups[0], compare_gids);
    buf_field(key, RECIPE_MAGIC);
    snprintf(number, sizeof number, "uid=%u gid=%u", (unsigned)getuid(), (unsigned)getgid());
    buf_field(key, number);
    buf_add(key, "groups=", 7);
    for (int i = 0; i < count; i++) {
        snprintf(number, sizeof number, i ? ",%u" : "%u", (unsigned)groups[i]);
        buf_add(key, number, strlen(number));
    }
    buf_add(key, "\n", 1);
    const char *config = getenv("SHIFTER_CONFIG");
    buf_add(key, "config=", 7);
    buf_field(key, config ? config : "");
    /* The job and node (a root prepared for them), and the request a job passes on. */
    static const char *context[] = {"SLURM_JOB_ID",         "SLURMD_NODENAME", "SHIFTER_IMAGE",
                                    "SHIFTER_IMAGEREQUEST", "SHIFTER_VOLUME",  "SHIFTER_MODULE"};
    for (size_t i = 0; i < sizeof context / sizeof context[0]; i++) {
        const char *value = getenv(context[i]);
        snprintf(number, sizeof number, "%s %zu:", context[i], value ? strlen(value) : 0);
        buf_add(key, number, strlen(number));
        buf_field(key, value ? value : "");
    }
    for (int i = 0; i < argc_options; i++) {
        snprintf(number, sizeof number, "option %zu:", strlen(options[i]));
        buf_add(key, number, strlen(number));
        buf_field(key, options[i]);
    }
}

static uint64_t fnv1a(const char *data, size_t len)
{
    uint64_t hash = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; i++) {
        hash ^= (unsigned char)data[i];
        hash *= 0x100000001b3ULL;
    }
    return hash;
}

/* The user's launch cache: $XDG_RUNTIME_DIR/shifter-launch or /tmp/shifter-launch-UID, a
 * directory of the user's that nobody else may write (else: no cache). */
static int cache_dir(char *out, size_t size)
{
    const char *xdg = getenv("XDG_RUNTIME_DIR");
    struct stat st;
    if (xdg && xdg[0] == '/' && stat(xdg, &st) == 0 && S_ISDIR(st.st_mode) &&
        st.st_uid == getuid())
        snprintf(out, size, "%s/shifter-launch", xdg);
    else
        snprintf(out, size, "/tmp/shifter-launch-%u", (unsigned)getuid());
    if (lstat(out, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != getuid() ||
        (st.st_mode & 022))
        return -1;
    return strpbrk(out, ",:\\\n") ? -1 : 0;
}

/* ---- the recipe -------------------------------------------------------------------------- */

/* A recipe is NUL-separated fields; see shifter_core.runtime.launch for the records. */
struct recipe {
    char *data;
    char *fields[MAX_FIELDS];
    int count, next;
};

static int read_recipe(const char *path, struct recipe *r)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != getuid() ||
        st.st_size > (1 << 22)) {
        close(fd);
        return -1;
    }
    r->data = malloc(st.st_size + 1);
    ssize_t got = r->data ? read(fd, r->data, st.st_size) : -1;
    close(fd);
    if (got != st.st_size)
        return -1;
    r->data[got] = 0;
    r->count = r->next = 0;
    for (char *p = r->data; p < r->data + got; p += strlen(p) + 1) {
        if (r->count == MAX_FIELDS)
            return -1;
        r->fields[r->count++] = p;
    }
    if (got == 0 || r->data[got - 1] != 0)
        return -1; /* cut short */
    return 0;
}

static const char *field(struct recipe *r)
{
    return r->next < r->count ? r->fields[r->next++] : NULL;
}

/* "dev:ino:size:mtime_ns" of a path (following symlinks), as Python's file_identity. */
static void identity(const char *path, char *out, size_t size)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(out, size, "missing");
        return;
    }
    snprintf(out, size, "%llu:%llu:%lld:%lld", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino, (long long)st.st_size,
             (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec);
}

struct mount_rec {
    const char *kind;   /* proc sys dev tmpfs tree bind device */
    const char *source; /* host path (bind, device, proc, sys) */
    const char *target; /* resolved path in the container */
    int inner, recursive, nodev, read_only, source_is_dir, check_access;
    unsigned mode;
    int fd; /* O_PATH source or open_tree clone, opened before anything is mounted */
};

struct plan {
    const char *job_root; /* a root the prolog prepared for this job: entered, not built */
    const char *userns;   /* the user namespace pinned for the job ("" if none) */
    const char *image, *squashfuse;
    struct mount_rec mounts[MAX_MOUNTS];
    int nmounts;
    int clearenv;
    const char *workdir;
    int workdir_explicit;
    int env_first, env_count; /* consecutive records: "env", op, name, value */
};

static int parse_int(const char *text)
{
    return text ? atoi(text) : 0;
}

/* Reads the recipe after the key; returns 0 when it is complete and still valid. */
static int load_plan(struct recipe *r, struct plan *p, const char **why)
{
    const char *rec;
    char now[128];
    memset(p, 0, sizeof *p);
    while ((rec = field(r))) {
        if (strcmp(rec, "depends") == 0) {
            const char *path = field(r), *then = field(r);
            if (!path || !then)
                return *why = "recipe cut short", -1;
            identity(path, now, sizeof now);
            if (strcmp(now, then) != 0)
                return *why = "a file the recipe depends on changed", -1;
        } else if (strcmp(rec, "expires") == 0) {
            const char *when = field(r);
            if (!when || (long long)time(NULL) >= atoll(when))
                return *why = "the image name's resolution expired", -1;
        } else if (strcmp(rec, "job-root") == 0) {
            p->job_root = field(r);
            p->userns = field(r);
            if (!p->userns)
                return *why = "recipe cut short", -1;
        } else if (strcmp(rec, "image") == 0) {
            p->image = field(r);
        } else if (strcmp(rec, "squashfuse") == 0) {
            p->squashfuse = field(r);
        } else if (strcmp(rec, "mount") == 0) {
            if (p->nmounts == MAX_MOUNTS)
                return *why = "too many mounts", -1;
            struct mount_rec *m = &p->mounts[p->nmounts++];
            m->kind = field(r);
            m->source = field(r);
            m->target = field(r);
            const char *flags = field(r), *mode = field(r);
            if (!m->kind || !m->source || !m->target || !flags || !mode)
                return *why = "recipe cut short", -1;
            m->inner = strchr(flags, 'i') != NULL;
            m->recursive = strchr(flags, 'r') != NULL;
            m->nodev = strchr(flags, 'n') != NULL;
            m->read_only = strchr(flags, 'o') != NULL;
            m->source_is_dir = strchr(flags, 'd') != NULL;
            m->check_access = strchr(flags, 'u') != NULL;
            m->mode = (unsigned)strtoul(mode, NULL, 8);
            m->fd = -1;
        } else if (strcmp(rec, "clearenv") == 0) {
            p->clearenv = parse_int(field(r));
        } else if (strcmp(rec, "env") == 0) {
            if (!p->env_count)
                p->env_first = r->next - 1;
            else if (r->next - 1 != p->env_first + 4 * p->env_count)
                return *why = "env records are not consecutive", -1;
            p->env_count++;
            if (!field(r) || !field(r) || !field(r))
                return *why = "recipe cut short", -1;
        } else if (strcmp(rec, "workdir") == 0) {
            p->workdir = field(r);
            p->workdir_explicit = parse_int(field(r));
        } else if (strcmp(rec, "end") == 0) {
            if (!p->image && !p->job_root)
                return *why = "recipe incomplete", -1;
            return 0;
        } else {
            return *why = "unknown recipe record", -1;
        }
    }
    return *why = "recipe cut short", -1;
}

/* ---- system calls ------------------------------------------------------------------------ */

static int open_tree_(int dfd, const char *path, unsigned flags)
{
    return (int)syscall(SYS_open_tree, dfd, path, flags);
}

static int move_mount_(int from_dfd, const char *from, int to_dfd, const char *to, unsigned flags)
{
    return (int)syscall(SYS_move_mount, from_dfd, from, to_dfd, to, flags);
}

static int mount_setattr_(int dfd, const char *path, unsigned flags, uint64_t set)
{
    struct mount_attr_arg attr = {.attr_set = set};
    return (int)syscall(SYS_mount_setattr, dfd, path, flags, &attr, sizeof attr);
}

/* Open ``path`` (relative to the root) beneath root_fd, never following a symlink. */
static int open_beneath(int root_fd, const char *path, int flags)
{
    struct open_how_arg how = {
        .flags = (uint64_t)(flags | O_CLOEXEC),
        .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    while (*path == '/')
        path++;
    return (int)syscall(SYS_openat2, root_fd, *path ? path : ".", &how, sizeof how);
}

static void fd_path(int fd, char *out, size_t size)
{
    snprintf(out, size, "/proc/self/fd/%d", fd);
}

static void write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        die("cannot write %s", path);
    close(fd);
}

/* mkdir -p below a directory fd (for mount points inside /dev), then the last component as
 * a directory or an empty file. */
static void make_inner(int base_fd, const char *rel, int directory)
{
    char path[4096];
    snprintf(path, sizeof path, "%s", rel);
    char *p = path;
    while (*p == '/')
        p++;
    for (char *slash = strchr(p, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = 0;
        if (mkdirat(base_fd, p, 0755) != 0 && errno != EEXIST)
            die("cannot make %s", p);
        *slash = '/';
    }
    if (directory) {
        if (mkdirat(base_fd, p, 0755) != 0 && errno != EEXIST)
            die("cannot make %s", p);
    } else {
        int fd = openat(base_fd, p, O_CREAT | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0644);
        if (fd < 0 && errno != EEXIST)
            die("cannot make %s", p);
        if (fd >= 0)
            close(fd);
    }
}

/* ---- the image server, started before the namespaces --------------------------------- */

/* squashfuse's low-level operations (libsquashfuse_ll), as its squashfuse_ll program sets
 * them up; served by a process of ours, so no program has to be loaded once the image is
 * mounted. */
static void serve_image(sqfs_ll *ll, int fuse_fd)
{
    struct fuse_lowlevel_ops ops;
    memset(&ops, 0, sizeof ops);
    ops.getattr = sqfs_ll_op_getattr;
    ops.opendir = sqfs_ll_op_opendir;
    ops.releasedir = sqfs_ll_op_releasedir;
    ops.readdir = sqfs_ll_op_readdir;
    ops.lookup = sqfs_ll_op_lookup;
    ops.open = sqfs_ll_op_open;
    ops.create = sqfs_ll_op_create;
    ops.release = sqfs_ll_op_release;
    ops.read = sqfs_ll_op_read;
    ops.readlink = sqfs_ll_op_readlink;
    ops.listxattr = sqfs_ll_op_listxattr;
    ops.getxattr = sqfs_ll_op_getxattr;
    ops.forget = sqfs_ll_op_forget;
    ops.statfs = stfs_ll_op_statfs;
    char *fuse_argv[] = {"shifter-squashfuse", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(1, fuse_argv);
    struct fuse_session *session = fuse_session_new(&args, &ops, sizeof ops, ll);
    char mountpoint[64];
    snprintf(mountpoint, sizeof mountpoint, "/dev/fd/%d", fuse_fd);
    if (!session || fuse_session_mount(session, mountpoint) != 0)
        _exit(1);
    fuse_session_loop(session); /* returns when the container's last process is gone */
    _exit(0);
}

/* Forks the image server (double fork: not our child, out of our session): it opens the
 * image meanwhile, waits for the FUSE descriptor on the socket and serves it; with nothing
 * sent it exits.  It is in none of the container's namespaces, so it keeps nothing alive:
 * when the mount namespace goes, the kernel ends the connection and the server exits.
 * Returns our end of the socket. */
static int start_image_server(const char *image)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        close(sv[0]);
        setsid();
        if (fork() != 0)
            _exit(0);
        prctl(PR_SET_NAME, SERVER_NAME, 0, 0, 0);
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1);
            dup2(null, 2);
        }
        if (chdir("/") != 0)
            _exit(127);
        sqfs_ll *ll = sqfs_ll_open(image, 0);
        if (!ll)
            _exit(1); /* the launcher's send fails: it says the image cannot be read */
        char byte;
        char control[CMSG_SPACE(sizeof(int))];
        struct iovec iov = {.iov_base = &byte, .iov_len = 1};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
        if (recvmsg(sv[1], &msg, 0) <= 0)
            _exit(0); /* never mounted */
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        if (!cmsg || cmsg->cmsg_type != SCM_RIGHTS)
            _exit(0);
        int fuse_fd;
        memcpy(&fuse_fd, CMSG_DATA(cmsg), sizeof fuse_fd);
        close(sv[1]);
        serve_image(ll, fuse_fd);
    }
    close(sv[1]);
    waitpid(pid, NULL, 0);
    return sv[0];
}

static void send_fd(int sock, int fd)
{
    char byte = 'g';
    char control[CMSG_SPACE(sizeof(int))];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof control};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &fd, sizeof fd);
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) != 1)
        die("the image cannot be served (is it a squashfs file?)");
}

/* ---- building the root ------------------------------------------------------------------- */

/* Join the user namespace pinned for the job (the user's gids all mapped); 0 if joined. */
static int join_user_namespace(const char *path)
{
    int fd = *path ? open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW) : -1;
    if (fd < 0)
        return -1;
    uid_t uid = getuid();
    int joined = setns(fd, CLONE_NEWUSER);
    close(fd);
    if (joined != 0)
        return -1;
    if (getuid() != uid)
        die("the user namespace at %s does not map uid %u", path, (unsigned)uid);
    if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        die("cannot make a mount namespace");
    return 0;
}

static void enter_namespaces(void)
{
    char map[64];
    uid_t uid = getuid();
    gid_t gid = getgid();
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0)
        die("cannot create a user namespace");
    write_file("/proc/self/setgroups", "deny");
    snprintf(map, sizeof map, "%u %u 1\n", (unsigned)uid, (unsigned)uid);
    write_file("/proc/self/uid_map", map);
    snprintf(map, sizeof map, "%u %u 1\n", (unsigned)gid, (unsigned)gid);
    write_file("/proc/self/gid_map", map);
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0)
        die("cannot make the mounts private");
}

static int is_tmpfs(const struct mount_rec *m)
{
    return !strcmp(m->kind, "dev") || !strcmp(m->kind, "tmpfs");
}

/* A host source as a detached mount (open_tree clone) with its final flags, made while
 * squashfuse_ll starts; the root only has to exist when it is moved into place. */
static void detach_source(struct mount_rec *m)
{
    int recursive = m->recursive && strcmp(m->kind, "device") != 0;
    m->fd = open_tree_(AT_FDCWD, m->source,
                       OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (recursive ? AT_RECURSIVE : 0));
    if (m->fd < 0)
        die("cannot take %s", m->source);
    uint64_t attrs = MOUNT_ATTR_NOSUID | (m->nodev ? MOUNT_ATTR_NODEV : 0);
    if (!strcmp(m->kind, "sys") || !strcmp(m->kind, "proc") || !strcmp(m->kind, "device"))
        attrs |= MOUNT_ATTR_NOEXEC;
    if (m->read_only || !strcmp(m->kind, "sys"))
        attrs |= MOUNT_ATTR_RDONLY;
    if (mount_setattr_(m->fd, "", AT_EMPTY_PATH | (m->recursive ? AT_RECURSIVE : 0), attrs) != 0)
        die("cannot set the flags of %s", m->source);
}

static void mount_one(struct mount_rec *m, int root_fd)
{
    char target[64];
    if (m->inner) {
        const char *top = strncmp(m->target, "/dev/", 5) == 0 ? "/dev" : "/tmp";
        int base = open_beneath(root_fd, top, O_PATH | O_DIRECTORY);
        if (base < 0)
            die("cannot open %s in the container", top);
        int directory = m->source_is_dir && strcmp(m->kind, "device") != 0;
        make_inner(base, m->target + strlen(top), directory);
        close(base);
    }
    int target_fd = open_beneath(root_fd, m->target, O_PATH);
    if (target_fd < 0)
        die("cannot open the mount point %s", m->target);
    if (is_tmpfs(m)) {
        char data[32];
        unsigned long flags = MS_NOSUID | (strcmp(m->kind, "dev") == 0 ? MS_NOEXEC : MS_NODEV);
        snprintf(data, sizeof data, "mode=%o", m->mode);
        fd_path(target_fd, target, sizeof target);
        if (mount("tmpfs", target, "tmpfs", flags, data) != 0)
            die("cannot mount a tmpfs at %s", m->target);
        if (strcmp(m->kind, "dev") == 0) {
            static const char *links[][2] = {{"fd", "/proc/self/fd"},
                                             {"stdin", "/proc/self/fd/0"},
                                             {"stdout", "/proc/self/fd/1"},
                                             {"stderr", "/proc/self/fd/2"}};
            int dev = open_beneath(root_fd, "/dev", O_PATH | O_DIRECTORY);
            if (dev < 0)
                die("cannot open /dev in the container");
            for (size_t i = 0; i < 4; i++)
                if (symlinkat(links[i][1], dev, links[i][0]) != 0)
                    die("cannot make /dev/%s", links[i][0]);
            close(dev);
        }
    } else if (move_mount_(m->fd, "", target_fd, "",
                           MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) != 0) {
        die("cannot attach %s at %s", m->source, m->target);
    }
    close(target_fd);
}

static void drop_privileges(void)
{
    int last = 63;
    FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "re");
    if (f) {
        if (fscanf(f, "%d", &last) != 1)
            last = 63;
        fclose(f);
    }
    for (int cap = 0; cap <= last; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno != EINVAL)
            die("cannot drop capability %d", cap);
    struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &header, data) != 0)
        die("cannot clear the capabilities");
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL)
        die("cannot clear the ambient capabilities");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        die("cannot set no_new_privs");
    if (getuid() == 0 || geteuid() == 0)
        die("refusing to run as root");
}

/* ---- the environment --------------------------------------------------------------------- */

static void apply_env(struct recipe *r, struct plan *p)
{
    if (p->clearenv)
        clearenv();
    r->next = p->env_first;
    for (int i = 0; i < p->env_count; i++) {
        r->next++; /* "env" */
        const char *op = r->fields[r->next++], *name = r->fields[r->next++];
        const char *value = r->fields[r->next++];
        const char *old = getenv(name);
        if (strcmp(op, "set") == 0) {
            setenv(name, value, 1);
        } else if (strcmp(op, "unset") == 0) {
            unsetenv(name);
        } else if (old && *old) { /* prepend, append: ':'-lists never get empty elements */
            size_t len = strlen(old) + strlen(value) + 2;
            char *joined = malloc(len);
            if (!joined)
                die("out of memory");
            if (strcmp(op, "prepend") == 0)
                snprintf(joined, len, "%s:%s", value, old);
            else
                snprintf(joined, len, "%s:%s", old, value);
            setenv(name, joined, 1);
            free(joined);
        } else {
            setenv(name, value, 1);
        }
    }
}

/* The last steps, in the container: no capabilities, the working directory, the
 * environment, exec. */
__attribute__((noreturn)) static void finish(struct recipe *recipe, struct plan *plan,
                                             const char *caller_cwd, char **command)
{
    drop_privileges();

    /* The working directory: -w DIR must exist; by default the caller's, else /. */
    const char *workdir = plan->workdir && *plan->workdir ? plan->workdir : caller_cwd;
    if (chdir(workdir) != 0) {
        if (plan->workdir_explicit)
            die("cannot change to the working directory %s", workdir);
        if (chdir("/") != 0)
            die("cannot change to /");
    }
    apply_env(recipe, plan);
    execvp(command[0], command);
    int saved = errno;
    if (saved == ENOENT) {
        fprintf(stderr,
                "shifter: %s: command not found in the container; check the image's PATH or "
                "give the full path\n",
                command[0]);
        _exit(127);
    }
    fprintf(stderr, "shifter: cannot run %s in the container: %s\n", command[0],
            strerror(saved));
    _exit(126);
}

/* ---- main -------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    original_argv = argv;
    if (getuid() == 0 || geteuid() == 0)
        fallback("run as root", NULL);
    if (getenv("SHIFTER_LAUNCH_DISABLE"))
        fallback("disabled by SHIFTER_LAUNCH_DISABLE", NULL);
    int command = command_index(argc, argv);
    if (command < 0 || command >= argc)
        fallback("options the launcher does not replay", NULL);

    static char caller_cwd[4096];
    if (!getcwd(caller_cwd, sizeof caller_cwd))
        strcpy(caller_cwd, "/");

    struct buf key = {0};
    make_key(&key, command - 1, argv + 1);
    char key_hex[17];
    snprintf(key_hex, sizeof key_hex, "%016llx", (unsigned long long)fnv1a(key.data, key.len));
    char cache[3072], dir[3200], path[3300];
    if (cache_dir(cache, sizeof cache) != 0)
        fallback("no launch cache", key_hex);
    snprintf(dir, sizeof dir, "%s/%s", cache, key_hex);
    snprintf(path, sizeof path, "%s/recipe", dir);
    struct recipe recipe;
    if (read_recipe(path, &recipe) != 0)
        fallback("no recipe", key_hex);
    const char *stored = field(&recipe);
    if (!stored || strcmp(stored, key.data) != 0)
        fallback("another request's recipe", key_hex);
    static struct plan plan;
    const char *why = NULL;
    if (load_plan(&recipe, &plan, &why) != 0)
        fallback(why, key_hex);
    snprintf(recipe_path, sizeof recipe_path, "%s", path);

    if (plan.job_root) {
        struct stat st;
        if (lstat(plan.job_root, &st) != 0 || !S_ISDIR(st.st_mode))
            fallback("the job's prepared root is gone", key_hex);
        /* From here on there is no way back to Python. */
        if (join_user_namespace(plan.userns) != 0)
            enter_namespaces();
        if (chroot(plan.job_root) != 0 || chdir("/") != 0)
            die("cannot enter the root prepared for this job");
        finish(&recipe, &plan, caller_cwd, argv + command);
    }

    /* Check every host source now, while Python can still explain a problem. */
    for (int i = 0; i < plan.nmounts; i++) {
        struct mount_rec *m = &plan.mounts[i];
        if (!strcmp(m->kind, "dev") || !strcmp(m->kind, "tmpfs") || !strcmp(m->kind, "tree"))
            continue;
        int fd = open(m->source, O_PATH | O_CLOEXEC);
        if (fd < 0)
            fallback("a source of a mount is missing", key_hex);
        struct stat st;
        if (fstat(fd, &st) != 0 || (S_ISDIR(st.st_mode) != 0) != (m->source_is_dir != 0))
            fallback("a source of a mount changed", key_hex);
        if (m->check_access) {
            fd_path(fd, path, sizeof path);
            if (access(path, R_OK | (m->source_is_dir ? X_OK : 0)) != 0)
                fallback("a volume's source is not readable", key_hex);
        }
        close(fd);
    }
    char upper[3300], lower[3300], root[3300];
    snprintf(upper, sizeof upper, "%s/upper", dir);
    snprintf(lower, sizeof lower, "%s/lower", dir);
    snprintf(root, sizeof root, "%s/root", dir);
    if (access(plan.image, R_OK) != 0)
        fallback("the image is not readable", key_hex);
    struct stat st;
    if (lstat(upper, &st) != 0 || !S_ISDIR(st.st_mode) || lstat(lower, &st) != 0 ||
        !S_ISDIR(st.st_mode) || lstat(root, &st) != 0 || !S_ISDIR(st.st_mode))
        fallback("the recipe's directories are incomplete", key_hex);
    int daemon = start_image_server(plan.image);
    if (daemon < 0)
        fallback("cannot start the image server", key_hex);

    /* From here on there is no way back to Python. */
    enter_namespaces();
    /* The clone of /tmp is taken before anything is mounted: it must not contain this
     * container's own mounts. */
    for (int i = 0; i < plan.nmounts; i++) {
        struct mount_rec *m = &plan.mounts[i];
        if (strcmp(m->kind, "tree") == 0) {
            m->fd = open_tree_(AT_FDCWD, m->source,
                               OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE);
            if (m->fd < 0 || mount_setattr_(m->fd, "", AT_EMPTY_PATH | AT_RECURSIVE,
                                            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV) != 0)
                die("cannot take %s", m->source);
        }
    }
    int fuse = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fuse < 0)
        die("cannot open /dev/fuse");
    char options[256];
    snprintf(options, sizeof options,
             "fd=%d,rootmode=40000,user_id=%u,group_id=%u,default_permissions", fuse,
             (unsigned)getuid(), (unsigned)getgid());
    if (mount("squashfuse_ll", lower, "fuse.squashfuse_ll", MS_RDONLY | MS_NOSUID | MS_NODEV,
              options) != 0)
        die("cannot mount the image %s", plan.image);
    send_fd(daemon, fuse);
    close(fuse);
    close(daemon);
    for (int i = 0; i < plan.nmounts; i++) /* meanwhile squashfuse_ll starts */
        if (!is_tmpfs(&plan.mounts[i]) && strcmp(plan.mounts[i].kind, "tree") != 0)
            detach_source(&plan.mounts[i]);
    char overlay[10000];
    snprintf(overlay, sizeof overlay, "lowerdir=%s:%s", upper, lower);
    if (mount("overlay", root, "overlay", MS_RDONLY | MS_NOSUID | MS_NODEV, overlay) != 0)
        die("cannot mount the container's root (is the image readable?)");
    int root_fd = open(root, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0)
        die("cannot open %s", root);
    for (int i = 0; i < plan.nmounts; i++)
        mount_one(&plan.mounts[i], root_fd);
    int dev = open_beneath(root_fd, "/dev", O_PATH);
    if (dev >= 0) {
        if (mount_setattr_(dev, "", AT_EMPTY_PATH, MOUNT_ATTR_RDONLY) != 0)
            die("cannot make /dev read-only");
        close(dev);
    }
    if (fchdir(root_fd) != 0 || syscall(SYS_pivot_root, ".", ".") != 0 ||
        umount2(".", MNT_DETACH) != 0 || chdir("/") != 0)
        die("cannot enter the container");
    for (int i = 0; i < plan.nmounts; i++)
        if (plan.mounts[i].fd >= 0)
            close(plan.mounts[i].fd);
    close(root_fd);
    finish(&recipe, &plan, caller_cwd, argv + command);
}
