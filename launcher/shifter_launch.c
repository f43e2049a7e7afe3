/*
 * shifter: the fast front end of the unprivileged runtime.  Python decides, this executes.
 *
 * After the Python runtime (src/shifter_core/runtime/) has built a container for a request,
 * it leaves a *recipe* in the user's launch cache (runtime/launch.py): the operations that
 * build the same container again, written out explicitly (runtime/recipe.py): every mount
 * with its source, target, type, flags and data, every detached bind with its attributes,
 * the directories, files and links to make, the user namespace, pivot or chroot, the
 * privileges to drop, the working directory and the environment.  When the same request
 * comes again (same options, user, groups and configuration, and none of the files it
 * depends on changed), this program executes those operations without starting Python.
 * It decides nothing itself: no flag, mode, path or mount kind comes from here.  What only
 * it can do is how: the image server (libsquashfuse, what squashfuse_ll runs, in a process
 * of its own), the namespaces, the mount system calls, pivot_root and the exec.
 *
 * A recipe is read whole and checked against its grammar (the same rules as
 * shifter_core.runtime.recipe.parse) before anything is executed: one that is cut short, of
 * another version, with an unknown operation, a wrong field count, a field too long or of
 * the wrong form, or operations out of order, is refused as a whole.  Anything it does not
 * recognise (an unknown option, no recipe or a refused one, a changed file, an error before
 * the namespaces exist) hands the whole command line to the Python implementation,
 * unchanged.
 *
 * SHIFTER_LAUNCH_DRY_RUN=FILE prints the operations of the recipe FILE in canonical text
 * (as recipe.render), or why it is refused (exit 3), and executes nothing;
 * SHIFTER_LAUNCH_DRY_RUN=1 does the same for the recipe a command line would replay.
 *
 * Nothing here is privileged: the process maps only its own uid and gid into a new user
 * namespace (or joins the one the prolog pinned for the job), exactly as the Python path
 * does, so a recipe can do nothing its user could not.
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
#include <sys/file.h>
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

#define KEY_MAGIC "shifter-launch-recipe-4" /* the first line of a request's key */
#define RECIPE_MAGIC "shifter-recipe"
#define RECIPE_VERSION "3"
#define SERVER_NAME "shifter-sqfs" /* the image server's name in ps */
#define EXIT_FAILED 125
#define EXIT_REFUSED 3 /* the dry run: the recipe would be left to Python */
/* The bounds of a recipe (as shifter_core.runtime.recipe) */
#define MAX_RECIPE_BYTES (1 << 22)
#define MAX_OPS 4096
#define MAX_ARGS 5
#define MAX_STRING 131072
#define MAX_PATH 4095
#define MAX_WORD 255
#define MAX_SLOTS 256
#define MAX_DIGITS 18

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
static int dry_run; /* SHIFTER_LAUNCH_DRY_RUN: print, never execute */
static int join_fd = -1; /* the siblings' rendezvous we build for, locked until we are in */

/* ---- falling back to Python ------------------------------------------------------------ */

/* Hand the command line to the Python implementation (which explains any problem itself).
 * ``miss`` tells it to leave a recipe for next time. */
__attribute__((noreturn)) static void fallback(const char *why, const char *key_hex)
{
    if (dry_run) {
        fprintf(stderr, "shifter: launcher: %s: would run the Python runtime\n", why);
        _exit(EXIT_REFUSED);
    }
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
__attribute__((noreturn, format(printf, 1, 2))) static void die(const char *fmt, ...)
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
    case 'i': case 'V': case 'e': case 'm': return 'r';
    case 'w': return 'o';
    case 'E': case 'v': case 'h': case 'n': return 'n';
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
    buf_field(key, KEY_MAGIC);
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
    static const char *context[] = {"SLURM_JOB_ID",         "SLURMD_NODENAME",   "SHIFTER_IMAGE",
                                    "SHIFTER_IMAGEREQUEST", "SHIFTER_IMAGETYPE", "SHIFTER_VOLUME",
                                    "SHIFTER_MODULE"};
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

/* The operations, as shifter_core.runtime.recipe.OPERATIONS: the name, the signature (one
 * letter a field: s string, p absolute path, P absolute path or "", e variable name, w word,
 * n number, o octal mode, x slot, m mount flags, a mount attributes, c "recursive" or "",
 * g propagation "private" or "slave", t "dir" or "file", r "", "r" or "rx") and the phase
 * (operations come in non-decreasing phase; before phase 3 the launcher may still fall back
 * to Python).  New mount namespaces are made slaves of the host's (MS_REC | MS_SLAVE, as the
 * Python runtime's): nothing propagates out, and a clone keeps its recipe's propagation. */
enum op_code {
    OP_KEY, OP_DEPENDS, OP_EXPIRES, OP_REQUIRE, OP_JOIN, OP_SERVE, OP_USERNS, OP_CLONE, OP_FUSE,
    OP_OVERLAY, OP_MOUNT, OP_ATTACH, OP_MKDIR, OP_MKFILE, OP_SYMLINK, OP_SETATTR, OP_PIVOT,
    OP_CHROOT, OP_DROP, OP_CHDIR, OP_CHDIR_CALLER, OP_ENV_CLEAR, OP_ENV_SET, OP_ENV_UNSET,
    OP_ENV_PREPEND, OP_ENV_APPEND, OP_EXEC, OP_COUNT
};

static const struct {
    const char *name, *signature;
    int phase;
} op_defs[OP_COUNT] = {
    [OP_KEY] = {"key", "s", 0},
    [OP_DEPENDS] = {"depends", "ps", 1},
    [OP_EXPIRES] = {"expires", "n", 1},
    [OP_REQUIRE] = {"require", "ptr", 1},
    [OP_JOIN] = {"join", "p", 2},
    [OP_SERVE] = {"serve", "p", 2},
    [OP_USERNS] = {"userns", "P", 3},
    [OP_CLONE] = {"clone", "xpcag", 4},
    [OP_FUSE] = {"fuse", "pms", 4},
    [OP_OVERLAY] = {"overlay", "pms", 4},
    [OP_MOUNT] = {"mount", "spwms", 5},
    [OP_ATTACH] = {"attach", "xp", 5},
    [OP_MKDIR] = {"mkdir", "po", 5},
    [OP_MKFILE] = {"mkfile", "po", 5},
    [OP_SYMLINK] = {"symlink", "sp", 5},
    [OP_SETATTR] = {"setattr", "pac", 5},
    [OP_PIVOT] = {"pivot", "", 6},
    [OP_CHROOT] = {"chroot", "p", 6},
    [OP_DROP] = {"drop", "nn", 7},
    [OP_CHDIR] = {"chdir", "p", 8},
    [OP_CHDIR_CALLER] = {"chdir-caller", "p", 8},
    [OP_ENV_CLEAR] = {"env-clear", "", 8},
    [OP_ENV_SET] = {"env-set", "es", 8},
    [OP_ENV_UNSET] = {"env-unset", "e", 8},
    [OP_ENV_PREPEND] = {"env-prepend", "es", 8},
    [OP_ENV_APPEND] = {"env-append", "es", 8},
    [OP_EXEC] = {"exec", "", 9},
};

/* The names of the flags a recipe may give.  Which flags a mount gets is the recipe's. */
struct flag_name {
    const char *name;
    unsigned long long bit;
};
static const struct flag_name mount_flag_names[] = {
    {"ro", MS_RDONLY}, {"nosuid", MS_NOSUID}, {"nodev", MS_NODEV}, {"noexec", MS_NOEXEC}, {0}};
static const struct flag_name mount_attr_names[] = {{"ro", MOUNT_ATTR_RDONLY},
                                                    {"nosuid", MOUNT_ATTR_NOSUID},
                                                    {"nodev", MOUNT_ATTR_NODEV},
                                                    {"noexec", MOUNT_ATTR_NOEXEC},
                                                    {0}};

struct op {
    int code;
    const char *arg[MAX_ARGS];         /* every field's text */
    unsigned long long num[MAX_ARGS]; /* numbers, modes, slots, flag sets, "recursive" */
};

struct recipe {
    char *data;
    size_t len;
    int count;
    struct op ops[MAX_OPS];
};

/* The recipe file (the user's own, regular, bounded); NULL or why not. */
static const char *read_recipe(const char *path, struct recipe *r)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return "no recipe";
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != getuid()) {
        close(fd);
        return "no recipe";
    }
    if (st.st_size > MAX_RECIPE_BYTES) {
        close(fd);
        return "recipe too large";
    }
    r->data = malloc(st.st_size + 1);
    ssize_t got = r->data ? read(fd, r->data, st.st_size) : -1;
    close(fd);
    if (got != st.st_size)
        return "no recipe";
    r->data[got] = 0;
    r->len = (size_t)got;
    return NULL;
}

struct cursor {
    char *next, *end;
};

/* The next NUL-terminated field (the data ends with a NUL, so strlen stays inside). */
static const char *take(struct cursor *c, size_t *len)
{
    if (c->next >= c->end)
        return NULL;
    char *field = c->next;
    *len = strlen(field);
    c->next += *len + 1;
    return field;
}

/* A decimal number below ``limit``: digits only, at most MAX_DIGITS of them. */
static int number(const char *text, size_t len, unsigned long long limit,
                  unsigned long long *out)
{
    if (len == 0 || len > MAX_DIGITS)
        return -1;
    unsigned long long value = 0;
    for (size_t i = 0; i < len; i++) {
        if (text[i] < '0' || text[i] > '9')
            return -1;
        value = value * 10 + (unsigned)(text[i] - '0');
    }
    if (value >= limit)
        return -1;
    *out = value;
    return 0;
}

/* A comma-separated set of flag names ("" for none). */
static int flag_set(const char *text, const struct flag_name *names, unsigned long long *out)
{
    *out = 0;
    if (!*text)
        return 0;
    for (const char *p = text;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        const struct flag_name *n = names;
        while (n->name && (strlen(n->name) != len || memcmp(n->name, p, len) != 0))
            n++;
        if (!n->name)
            return -1;
        *out |= n->bit;
        if (!comma)
            return 0;
        p = comma + 1;
    }
}

/* One field of type ``kind``; NULL or why it is refused. */
static const char *check_field(char kind, const char *text, size_t len, unsigned long long *num)
{
    switch (kind) {
    case 's': case 'p': case 'P': case 'e': case 'w': case 't': case 'r':
        if (len > MAX_STRING)
            return "field too long";
        if (kind == 'p' || (kind == 'P' && len)) {
            if (text[0] != '/' || len > MAX_PATH)
                return "bad path";
        } else if (kind == 'e') {
            if (!len || memchr(text, '=', len))
                return "bad variable name";
        } else if (kind == 'w') {
            if (!len || len > MAX_WORD)
                return "bad word";
        } else if (kind == 't') {
            if (strcmp(text, "dir") != 0 && strcmp(text, "file") != 0)
                return "bad type";
        } else if (kind == 'r') {
            if (*text && strcmp(text, "r") != 0 && strcmp(text, "rx") != 0)
                return "bad access";
        }
        return NULL;
    case 'n':
        return number(text, len, 1000000000000000000ULL, num) ? "bad number" : NULL;
    case 'x':
        return number(text, len, MAX_SLOTS, num) ? "bad slot" : NULL;
    case 'o':
        if (len == 0 || len > 5 || strspn(text, "01234567") != len)
            return "bad mode";
        *num = strtoull(text, NULL, 8);
        return *num > 07777 ? "bad mode" : NULL;
    case 'c':
        if (*text && strcmp(text, "recursive") != 0)
            return "bad clone flags";
        *num = *text != 0;
        return NULL;
    case 'g':
        if (strcmp(text, "private") == 0)
            *num = MS_PRIVATE;
        else if (strcmp(text, "slave") == 0)
            *num = MS_SLAVE;
        else
            return "bad propagation";
        return NULL;
    case 'm':
        return flag_set(text, mount_flag_names, num) ? "unknown flag" : NULL;
    case 'a':
        return flag_set(text, mount_attr_names, num) ? "unknown flag" : NULL;
    }
    return "bad signature";
}

/* The order of the operations (as recipe._Order): what must come before what. */
struct order {
    int phase, count;
    int seen[OP_COUNT];
    char slots[MAX_SLOTS]; /* 0 free, 1 cloned, 2 attached */
};

static const char *check_order(struct order *o, int index, const struct op *op)
{
    int code = op->code, phase = op_defs[code].phase;
    int *seen = o->seen;
    if ((index == 0) != (code == OP_KEY))
        return "the recipe must start with its key";
    if (phase < o->phase)
        return "operations out of order";
    if ((code == OP_USERNS || code == OP_SERVE || code == OP_FUSE || code == OP_OVERLAY ||
         code == OP_DROP || code == OP_JOIN) && seen[code])
        return "an operation repeated";
    if (code == OP_JOIN && seen[OP_SERVE])
        return "join after serve";
    if (code == OP_CHROOT && seen[OP_JOIN])
        return "join with a prepared root";
    if (phase >= 4 && !seen[OP_USERNS])
        return "no namespaces";
    if (code == OP_FUSE && !seen[OP_SERVE])
        return "nothing serves the image";
    if (((phase == 5) || code == OP_PIVOT) && !seen[OP_OVERLAY])
        return "no root";
    if ((code == OP_PIVOT || code == OP_CHROOT) &&
        (seen[OP_PIVOT] || seen[OP_CHROOT] || (code == OP_CHROOT && seen[OP_OVERLAY])))
        return "the root is entered twice";
    if (code == OP_DROP && !seen[OP_PIVOT] && !seen[OP_CHROOT])
        return "no root entered";
    if (phase >= 8 && !seen[OP_DROP])
        return "privileges not dropped";
    if ((code == OP_EXEC) != (index == o->count - 1))
        return "the recipe must end with exec";
    if (code == OP_CLONE) {
        if (o->slots[op->num[0]])
            return "a slot used twice";
        o->slots[op->num[0]] = 1;
    } else if (code == OP_ATTACH) {
        if (o->slots[op->num[0]] != 1)
            return "a slot not cloned";
        o->slots[op->num[0]] = 2;
    }
    seen[code] = 1;
    o->phase = phase;
    return NULL;
}

/* Checks the whole recipe and fills r->ops; NULL, or why it is refused (then nothing of it
 * may be executed). */
static const char *parse_recipe(struct recipe *r)
{
    if (r->len == 0 || r->data[r->len - 1] != 0)
        return "recipe cut short";
    struct cursor c = {r->data, r->data + r->len};
    size_t len;
    unsigned long long count;
    const char *f = take(&c, &len);
    if (!f)
        return "recipe cut short";
    if (strcmp(f, RECIPE_MAGIC) != 0)
        return "not a recipe";
    if (!(f = take(&c, &len)))
        return "recipe cut short";
    if (strcmp(f, RECIPE_VERSION) != 0)
        return "not a version " RECIPE_VERSION " recipe";
    if (!(f = take(&c, &len)))
        return "recipe cut short";
    if (number(f, len, MAX_OPS + 1, &count) != 0 || count == 0)
        return "bad operation count";
    static struct order order;
    memset(&order, 0, sizeof order);
    order.count = r->count = (int)count;
    for (int i = 0; i < r->count; i++) {
        struct op *op = &r->ops[i];
        if (!(f = take(&c, &len)))
            return "recipe cut short";
        for (op->code = 0; op->code < OP_COUNT; op->code++)
            if (strcmp(op_defs[op->code].name, f) == 0)
                break;
        if (op->code == OP_COUNT)
            return "unknown operation";
        const char *signature = op_defs[op->code].signature;
        unsigned long long fields;
        if (!(f = take(&c, &len)))
            return "recipe cut short";
        if (number(f, len, 100, &fields) != 0)
            return "bad field count";
        if (fields != strlen(signature))
            return "wrong field count";
        for (int j = 0; signature[j]; j++) {
            if (!(op->arg[j] = take(&c, &len)))
                return "recipe cut short";
            const char *why = check_field(signature[j], op->arg[j], len, &op->num[j]);
            if (why)
                return why;
        }
        const char *why = check_order(&order, i, op);
        if (why)
            return why;
    }
    return c.next == c.end ? NULL : "data after the last operation";
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

/* ---- the dry run: the canonical text (as recipe.render) ---------------------------------- */

static void print_text(const char *text)
{
    if (!*text)
        fputs("\"\"", stdout);
    for (const unsigned char *p = (const unsigned char *)text; *p; p++) {
        if (*p > 0x20 && *p < 0x7f && *p != '"' && *p != '\\')
            putchar(*p);
        else
            printf("\\x%02x", *p);
    }
}

static void print_flags(unsigned long long set, const struct flag_name *names)
{
    if (!set)
        fputs("\"\"", stdout);
    for (int first = 1; names->name; names++) {
        if (set & names->bit) {
            printf("%s%s", first ? "" : ",", names->name);
            first = 0;
        }
    }
}

static void print_recipe(const struct recipe *r)
{
    for (int i = 0; i < r->count; i++) {
        const struct op *op = &r->ops[i];
        const char *signature = op_defs[op->code].signature;
        fputs(op_defs[op->code].name, stdout);
        for (int j = 0; signature[j]; j++) {
            putchar(' ');
            switch (signature[j]) {
            case 'n': case 'x': printf("%llu", op->num[j]); break;
            case 'o': printf("%llo", op->num[j]); break;
            case 'c': print_text(op->num[j] ? "recursive" : ""); break;
            case 'g': print_text(op->num[j] == MS_SLAVE ? "slave" : "private"); break;
            case 'm': print_flags(op->num[j], mount_flag_names); break;
            case 'a': print_flags(op->num[j], mount_attr_names); break;
            default: print_text(op->arg[j]);
            }
        }
        putchar('\n');
    }
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

static int mount_setattr_(int dfd, const char *path, unsigned flags, uint64_t set,
                          uint64_t propagation)
{
    struct mount_attr_arg attr = {.attr_set = set, .propagation = propagation};
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
        if (join_fd >= 0)
            close(join_fd); /* the siblings' lock is the launcher's to release */
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
    if (unshare(CLONE_NEWNS) != 0 || mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) != 0)
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
    if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) != 0)
        die("cannot make the mounts slaves");
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


/* ---- sharing a container among siblings (recipe.py's "join"; runtime/siblings.py) ------- */

static unsigned long long own_start;    /* this process's start time (for the rendezvous) */

/* The start time of process PID (field 22 of /proc/PID/stat); 0 if it is gone. */
static int start_time(pid_t pid, unsigned long long *out)
{
    char path[64], text[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return -1;
    text[n] = 0;
    char *p = strrchr(text, ')');
    for (int field = 2; p && field < 22; field++)
        p = strchr(p + 1, ' ');
    if (!p)
        return -1;
    *out = strtoull(p + 1, NULL, 10);
    return 0;
}

/* Processes with the same parent that ask for the same container share one: the first
 * builds it and offers it, the others join its user and mount namespaces (as MPI ranks
 * need). They meet at DIR/.join-KEY-PPID-START, locked by the builder until it is in the
 * root; it then holds "PID START". 1 if this process joined a live sibling's container. */
static int join_sibling(const char *dir, const char *key_hex)
{
    char path[4200], text[64] = {0};
    unsigned long long parent_start, start, now;
    pid_t parent = getppid();
    int pid;
    if (start_time(parent, &parent_start) != 0 || start_time(getpid(), &own_start) != 0)
        return 0;
    snprintf(path, sizeof path, "%s/.join-%s-%d-%llu", dir, key_hex, (int)parent, parent_start);
    int fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return 0;
    if (flock(fd, LOCK_EX) != 0) {
        close(fd);
        return 0;
    }
    ssize_t n = pread(fd, text, sizeof text - 1, 0);
    if (n > 0 && sscanf(text, "%d %llu", &pid, &start) == 2 && pid > 0 &&
        start_time(pid, &now) == 0 && now == start) {
        char ns[64];
        snprintf(ns, sizeof ns, "/proc/%d/ns/user", pid);
        int user = open(ns, O_RDONLY | O_CLOEXEC);
        snprintf(ns, sizeof ns, "/proc/%d/ns/mnt", pid);
        int mnt = open(ns, O_RDONLY | O_CLOEXEC);
        if (user >= 0 && mnt >= 0 && setns(user, CLONE_NEWUSER) == 0) {
            if (setns(mnt, CLONE_NEWNS) != 0)
                die("cannot join the container of process %d", pid);
            close(user);
            close(mnt);
            close(fd);
            return 1;
        }
        if (user >= 0)
            close(user);
        if (mnt >= 0)
            close(mnt);
    }
    join_fd = fd;
    return 0;
}

/* In the root we built: offer it to the siblings that wait. */
static void offer_to_siblings(void)
{
    char text[64];
    if (join_fd < 0)
        return;
    int len = snprintf(text, sizeof text, "%d %llu\n", (int)getpid(), own_start);
    if (ftruncate(join_fd, 0) != 0 || pwrite(join_fd, text, (size_t)len, 0) != len)
        die("cannot offer the container to the other processes");
    close(join_fd);
    join_fd = -1;
}

/* ---- executing the recipe ---------------------------------------------------------------- */

static int slots[MAX_SLOTS];          /* detached mounts (clone), until attached */
static const char *slot_source[MAX_SLOTS];
static int root_fd = -1;              /* the container's root (overlay), for paths in it */
static int image_server = -1;         /* our end of the image server's socket (serve) */
static char caller_cwd[4096];

/* Opens the directory holding ``path`` beneath the root; ``name`` is its last component. */
static int open_parent(const char *path, char *name, size_t size)
{
    char parent[MAX_PATH + 1];
    snprintf(parent, sizeof parent, "%s", path);
    char *slash = strrchr(parent, '/');
    snprintf(name, size, "%s", slash + 1);
    *slash = 0;
    if (!*name)
        die("no name in %s", path);
    int fd = open_beneath(root_fd, parent, O_PATH | O_DIRECTORY);
    if (fd < 0)
        die("cannot open the directory of %s in the container", path);
    return fd;
}

static void set_env(const char *name, const char *value)
{
    if (setenv(name, value, 1) != 0)
        die("cannot set %s", name);
}

/* NAME=VALUE:old (prepend) or old:VALUE (append); VALUE alone for an unset or empty NAME. */
static void join_env(const char *name, const char *value, int prepend)
{
    const char *old = getenv(name);
    if (!old || !*old) {
        set_env(name, value);
        return;
    }
    size_t len = strlen(old) + strlen(value) + 2;
    char *joined = malloc(len);
    if (!joined)
        die("out of memory");
    snprintf(joined, len, "%s:%s", prepend ? value : old, prepend ? old : value);
    set_env(name, joined);
    free(joined);
}

__attribute__((noreturn)) static void run_command(char **command)
{
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

/* One operation.  Before ``userns`` a failure goes back to Python; after it, it is fatal. */
static void execute(const struct op *op, const char *key_hex, char **command)
{
    const char *const *a = op->arg;
    const unsigned long long *n = op->num;
    char name[MAX_PATH + 1], path[64];
    struct stat st;
    int fd;
    switch (op->code) {
    case OP_KEY: /* compared before anything is executed */
        break;
    case OP_DEPENDS: {
        char now[128];
        identity(a[0], now, sizeof now);
        if (strcmp(now, a[1]) != 0)
            fallback("a file the recipe depends on changed", key_hex);
        break;
    }
    case OP_EXPIRES:
        if ((unsigned long long)time(NULL) >= n[0])
            fallback("the image name's resolution expired", key_hex);
        break;
    case OP_REQUIRE:
        fd = open(a[0], O_PATH | O_CLOEXEC);
        if (fd < 0)
            fallback("a path the recipe needs is missing", key_hex);
        if (fstat(fd, &st) != 0 || (S_ISDIR(st.st_mode) != 0) != (strcmp(a[1], "dir") == 0))
            fallback("a path the recipe needs changed", key_hex);
        close(fd);
        if (*a[2] && access(a[0], R_OK | (a[2][1] ? X_OK : 0)) != 0)
            fallback("a path the recipe needs is not accessible", key_hex);
        break;
    case OP_JOIN: /* executed by main, before the others */
        break;
    case OP_SERVE:
        image_server = start_image_server(a[0]);
        if (image_server < 0)
            fallback("cannot start the image server", key_hex);
        break;
    case OP_USERNS: /* from here on there is no way back to Python */
        if (!*a[0] || join_user_namespace(a[0]) != 0)
            enter_namespaces();
        break;
    case OP_CLONE:
        slots[n[0]] = open_tree_(AT_FDCWD, a[1],
                                 OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (n[2] ? AT_RECURSIVE : 0));
        slot_source[n[0]] = a[1];
        if (slots[n[0]] < 0)
            die("cannot take %s", a[1]);
        if (mount_setattr_(slots[n[0]], "", AT_EMPTY_PATH | (n[2] ? AT_RECURSIVE : 0), n[3],
                           n[4]) != 0)
            die("cannot set the flags of %s", a[1]);
        break;
    case OP_FUSE: {
        fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
        if (fd < 0)
            die("cannot open /dev/fuse");
        size_t size = strlen(a[2]) + 32;
        char *data = malloc(size);
        if (!data)
            die("out of memory");
        snprintf(data, size, "fd=%d,%s", fd, a[2]);
        if (mount("squashfuse_ll", a[0], "fuse.squashfuse_ll", n[1], data) != 0)
            die("cannot mount the image at %s", a[0]);
        free(data);
        send_fd(image_server, fd);
        close(fd);
        close(image_server);
        break;
    }
    case OP_OVERLAY:
        if (mount("overlay", a[0], "overlay", n[1], a[2]) != 0)
            die("cannot mount the container's root (is the image readable?)");
        root_fd = open(a[0], O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (root_fd < 0)
            die("cannot open %s", a[0]);
        break;
    case OP_MOUNT:
        fd = open_beneath(root_fd, a[1], O_PATH);
        if (fd < 0)
            die("cannot open the mount point %s", a[1]);
        fd_path(fd, path, sizeof path);
        if (mount(a[0], path, a[2], n[3], a[4]) != 0)
            die("cannot mount %s at %s", a[2], a[1]);
        close(fd);
        break;
    case OP_ATTACH:
        fd = open_beneath(root_fd, a[1], O_PATH);
        if (fd < 0)
            die("cannot open the mount point %s", a[1]);
        if (move_mount_(slots[n[0]], "", fd, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))
            die("cannot attach %s at %s", slot_source[n[0]], a[1]);
        close(fd);
        close(slots[n[0]]);
        slots[n[0]] = -1;
        break;
    case OP_MKDIR:
        fd = open_parent(a[0], name, sizeof name);
        if (mkdirat(fd, name, (mode_t)n[1]) == 0) {
            if (fchmodat(fd, name, (mode_t)n[1], 0) != 0)
                die("cannot set the mode of %s", a[0]);
        } else if (errno != EEXIST) {
            die("cannot make %s", a[0]);
        }
        close(fd);
        break;
    case OP_MKFILE: {
        int dir = open_parent(a[0], name, sizeof name);
        fd = openat(dir, name, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW,
                    (mode_t)n[1]);
        if (fd >= 0) {
            if (fchmod(fd, (mode_t)n[1]) != 0)
                die("cannot set the mode of %s", a[0]);
            close(fd);
        } else if (errno != EEXIST) {
            die("cannot make %s", a[0]);
        }
        close(dir);
        break;
    }
    case OP_SYMLINK:
        fd = open_parent(a[1], name, sizeof name);
        if (symlinkat(a[0], fd, name) != 0)
            die("cannot make %s", a[1]);
        close(fd);
        break;
    case OP_SETATTR:
        fd = open_beneath(root_fd, a[0], O_PATH);
        if (fd < 0 || mount_setattr_(fd, "", AT_EMPTY_PATH | (n[2] ? AT_RECURSIVE : 0), n[1], 0))
            die("cannot set the flags of %s", a[0]);
        close(fd);
        break;
    case OP_PIVOT:
        if (fchdir(root_fd) != 0 || syscall(SYS_pivot_root, ".", ".") != 0 ||
            umount2(".", MNT_DETACH) != 0 || chdir("/") != 0)
            die("cannot enter the container");
        offer_to_siblings();
        for (int i = 0; i < MAX_SLOTS; i++)
            if (slots[i] >= 0)
                close(slots[i]);
        close(root_fd);
        break;
    case OP_CHROOT:
        if (chroot(a[0]) != 0 || chdir("/") != 0)
            die("cannot enter the root prepared for this job");
        break;
    case OP_DROP:
        drop_privileges();
        if (getuid() != n[0] || getgid() != n[1])
            die("the container would run as %u:%u, not as %llu:%llu", (unsigned)getuid(),
                (unsigned)getgid(), n[0], n[1]);
        break;
    case OP_CHDIR:
        if (chdir(a[0]) != 0)
            die("cannot change to the working directory %s", a[0]);
        break;
    case OP_CHDIR_CALLER:
        if (chdir(caller_cwd) != 0 && chdir(a[0]) != 0)
            die("cannot change to %s", a[0]);
        break;
    case OP_ENV_CLEAR:
        clearenv();
        break;
    case OP_ENV_SET:
        set_env(a[0], a[1]);
        break;
    case OP_ENV_UNSET:
        unsetenv(a[0]);
        break;
    case OP_ENV_PREPEND:
    case OP_ENV_APPEND:
        join_env(a[0], a[1], op->code == OP_ENV_PREPEND);
        break;
    case OP_EXEC:
        run_command(command);
    }
}

/* ---- inside a container ------------------------------------------------------------------ */

/* In one of our containers (SHIFTER_RUNTIME=1, and the host's Python is not there), where the
 * runtime binds this launcher as /usr/bin/shifter: `srun --image=X shifter CMD`, as NERSC's
 * job scripts say it, runs CMD here. --image may only name this container's image (its
 * request or id:ID); -V and -m cannot change a running container; -e/--env NAME=VALUE,
 * -E/--clearenv and -w/--workdir=DIR apply. */
static int in_container(void)
{
    const char *runtime = getenv("SHIFTER_RUNTIME");
    return runtime && strcmp(runtime, "1") == 0 && access(SHIFTER_PYTHON, X_OK) != 0;
}

/* The value of the option at argv[*i] (long --name=V / --name V, short -xV / -x V). */
static const char *option_value(int argc, char **argv, int *i)
{
    const char *arg = argv[*i], *eq = strchr(arg, '=');
    if (arg[1] == '-')
        return eq ? eq + 1 : (*i + 1 < argc ? argv[++*i] : NULL);
    return arg[2] ? arg + 2 : (*i + 1 < argc ? argv[++*i] : NULL);
}

static int same_image(const char *asked)
{
    const char *request = getenv("SHIFTER_IMAGEREQUEST"), *id = getenv("SHIFTER_IMAGE");
    if (request && (strcmp(asked, request) == 0 ||
                    (strncmp(request, "docker:", 7) == 0 && strcmp(asked, request + 7) == 0)))
        return 1;
    if (id && strncmp(asked, "id:", 3) == 0) {
        const char *hex = asked + 3;
        if (strncmp(hex, "sha256:", 7) == 0)
            hex += 7;
        return strlen(hex) >= 12 && strncmp(id, hex, strlen(hex)) == 0;
    }
    return 0;
}

__attribute__((noreturn)) static void run_in_container(int argc, char **argv)
{
    int command = command_index(argc, argv);
    if (command < 0 || command >= argc) {
        fprintf(stderr, "shifter: inside a container: usage: shifter [--image=THIS] [-e N=V] "
                        "[-E] [-w DIR] COMMAND...\n");
        _exit(EXIT_FAILED);
    }
    const char *workdir = NULL;
    for (int i = 1; i < command; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0)
            break;
        char kind = arg[1] == '-' ? 0 : arg[1];
        const char *name = arg[1] == '-' ? arg + 2 : NULL;
        size_t len = name ? strcspn(name, "=") : 0;
#define IS(long_name, letter) ((name && len == strlen(long_name) && \
                                strncmp(name, long_name, len) == 0) || kind == (letter))
        if (IS("image", 'i')) {
            const char *asked = option_value(argc, argv, &i);
            if (!asked || !same_image(asked)) {
                fprintf(stderr, "shifter: already in the container of %s: it cannot start "
                                "another image (%s)\n",
                        getenv("SHIFTER_IMAGEREQUEST") ? getenv("SHIFTER_IMAGEREQUEST") : "?",
                        asked ? asked : "");
                _exit(EXIT_FAILED);
            }
        } else if (IS("volume", 'V') || IS("module", 'm')) {
            fprintf(stderr, "shifter: inside a container, %s cannot change it: give volumes "
                            "and modules to srun or sbatch\n", arg);
            _exit(EXIT_FAILED);
        } else if (IS("env", 'e')) {
            const char *assignment = option_value(argc, argv, &i);
            const char *eq = assignment ? strchr(assignment, '=') : NULL;
            if (!eq || eq == assignment) {
                fprintf(stderr, "shifter: --env needs NAME=VALUE\n");
                _exit(EXIT_FAILED);
            }
            char *copy = strdup(assignment);
            if (!copy)
                _exit(EXIT_FAILED);
            copy[eq - assignment] = 0;
            set_env(copy, copy + (eq - assignment) + 1);
        } else if (IS("clearenv", 'E')) {
            clearenv();
        } else if (IS("workdir", 'w')) {
            workdir = strchr(arg, '=') ? strchr(arg, '=') + 1 : (kind && arg[2] ? arg + 2 : NULL);
        } else if (!(IS("verbose", 'v') || kind == 'n')) {
            fprintf(stderr, "shifter: inside a container, %s is not supported\n", arg);
            _exit(EXIT_FAILED);
        }
#undef IS
    }
    if (workdir && chdir(workdir) != 0) {
        fprintf(stderr, "shifter: cannot change to %s: %s\n", workdir, strerror(errno));
        _exit(EXIT_FAILED);
    }
    run_command(argv + command);
}

/* ---- main -------------------------------------------------------------------------------- */

static struct recipe recipe;

/* SHIFTER_LAUNCH_DRY_RUN=FILE: the operations of FILE, or why it is refused. */
static int dry_run_file(const char *path)
{
    const char *why = read_recipe(path, &recipe);
    if (!why)
        why = parse_recipe(&recipe);
    if (why)
        fallback(why, NULL);
    print_recipe(&recipe);
    return fflush(stdout) == 0 ? 0 : EXIT_FAILED;
}

int main(int argc, char **argv)
{
    original_argv = argv;
    const char *dry = getenv("SHIFTER_LAUNCH_DRY_RUN");
    if (dry && *dry) {
        dry_run = 1;
        if (dry[0] == '/')
            return dry_run_file(dry);
    }
    if (in_container())
        run_in_container(argc, argv);
    if (getuid() == 0 || geteuid() == 0)
        fallback("run as root", NULL);
    if (getenv("SHIFTER_LAUNCH_DISABLE"))
        fallback("disabled by SHIFTER_LAUNCH_DISABLE", NULL);
    int command = command_index(argc, argv);
    if (command < 0 || command >= argc)
        fallback("options the launcher does not replay", NULL);

    if (!getcwd(caller_cwd, sizeof caller_cwd))
        strcpy(caller_cwd, "/");

    struct buf key = {0};
    make_key(&key, command - 1, argv + 1);
    char key_hex[17];
    snprintf(key_hex, sizeof key_hex, "%016llx", (unsigned long long)fnv1a(key.data, key.len));
    char cache[3072], path[3300];
    if (cache_dir(cache, sizeof cache) != 0)
        fallback("no launch cache", key_hex);
    snprintf(path, sizeof path, "%s/%s/recipe", cache, key_hex);
    const char *why = read_recipe(path, &recipe);
    if (why)
        fallback(why, key_hex);
    if ((why = parse_recipe(&recipe))) {
        static char refused[128];
        snprintf(refused, sizeof refused, "recipe refused (%s)", why);
        fallback(refused, key_hex);
    }
    if (strcmp(recipe.ops[0].arg[0], key.data) != 0)
        fallback("another request's recipe", key_hex);
    if (dry_run) {
        print_recipe(&recipe);
        return fflush(stdout) == 0 ? 0 : EXIT_FAILED;
    }
    snprintf(recipe_path, sizeof recipe_path, "%s", path);
    for (int i = 0; i < MAX_SLOTS; i++)
        slots[i] = -1;
    int joined = 0;
    for (int i = 0; i < recipe.count; i++) {
        const struct op *op = &recipe.ops[i];
        if (op->code == OP_JOIN)
            joined = join_sibling(op->arg[0], key_hex);
        else if (!joined || op_defs[op->code].phase >= op_defs[OP_DROP].phase)
            execute(op, key_hex, argv + command);
    }
    die("the recipe ends without exec"); /* parse_recipe refuses that */
}
