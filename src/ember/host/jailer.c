/*
 * ember-jailer: run a VMM (or qemu-img) as an unprivileged user in a new
 * mount namespace whose root holds only what it needs. Run as root by the
 * daemon:
 *
 *   ember-jailer [options] -- /abs/command ARGS...
 *
 *   --uid N, --gid N    the ids to run as (required; 1 .. 2^32-2, digits only)
 *   --groups N,N,...    supplementary groups (default: none)
 *   --cgroup PATH       a cgroup.procs file to join (repeatable)
 *   --netns             a fresh network namespace (no network at all)
 *   --root DIR          required: an existing, empty, root-owned directory
 *                       (not writable by others), the mount point of the new root
 *   --ro PATH           bind PATH (a file or directory) read-only at the same
 *                       path in the new root (nosuid,nodev)
 *   --rw PATH           the same, read-write (nosuid,nodev,noexec)
 *   --dev PATH          bind a character device, e.g. /dev/kvm (nosuid,noexec)
 *   --fsize BYTES       RLIMIT_FSIZE (default: unlimited)
 *   --nofile N          RLIMIT_NOFILE (default 4096)
 *   --keep-fds N        fds 3 .. 3+N-1 must be open and stay open across exec;
 *                       every other fd above 2 is closed (default 0)
 *
 * Paths are absolute, with no '.', '..' or empty components and no symlink in
 * any component (resolve them first): the jailer opens each one without
 * following symlinks and binds what it opened, so a path a VMM uid can write
 * cannot redirect a bind to another host file.
 *
 * In order: parse everything; join the cgroups; unshare the mount (and
 * network) namespace; make every mount private; mount a small tmpfs on the
 * root; bind /usr read-only, recreate the merged-/usr links (/bin, /sbin,
 * /lib, /lib64 -> usr/...) that the host has, bind /dev/null, /dev/zero and
 * /dev/urandom, then every --ro, --rw and --dev; pivot_root into it, detach
 * the old root, chdir("/") and make the new root read-only; set the rlimits
 * (RLIMIT_CORE 0), the groups, gid and uid; PR_SET_NO_NEW_PRIVS and
 * PR_SET_THP_DISABLE; close the
 * other fds; exec with an empty environment and umask 077.
 *
 * The root holds no /proc, /sys, /etc or /tmp: QEMU (microvm, TCG or KVM, as
 * Ember runs it) and qemu-img run without them. Without /proc/self/exe QEMU
 * falls back to its built-in data and module directories, under /usr; without
 * /etc/ld.so.cache the loader searches its default directories, which hold
 * every library Debian's QEMU links.
 *
 * Any failure exits 111 with a message on stderr and nothing is executed.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/magic.h>
#include <linux/openat2.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_ITEMS 64
#define MAX_GROUPS 32
#define ROOT_TMPFS "mode=0755,size=1m,nr_inodes=1024"

enum kind { RO, RW, DEV };
struct bind { enum kind kind; const char *path; };

static struct {
    uid_t uid; gid_t gid;
    gid_t groups[MAX_GROUPS]; size_t ngroups;
    const char *cgroups[MAX_ITEMS]; size_t ncgroups;
    struct bind binds[MAX_ITEMS]; size_t nbinds;
    const char *root;
    int netns;
    rlim_t fsize, nofile;
    unsigned keep_fds;
    char **cmd;
} opt = {.fsize = RLIM_INFINITY, .nofile = 4096};

__attribute__((noreturn)) static void die(const char *what, const char *detail) {
    fprintf(stderr, "ember-jailer: %s: %s\n", what, detail);
    exit(111);
}

__attribute__((noreturn)) static void fail(const char *what) { die(what, strerror(errno)); }

/* Decimal digits only, no sign, no overflow, at most max. */
static uint64_t number(const char *s, uint64_t max, const char *what) {
    uint64_t v = 0;
    if (*s == '\0') die(what, "not a number");
    for (; *s; s++) {
        if (*s < '0' || *s > '9') die(what, "not a number");
        if (v > (max - (uint64_t)(*s - '0')) / 10) die(what, "out of range");
        v = v * 10 + (uint64_t)(*s - '0');
    }
    return v;
}

/* A uid or gid: 1 .. 2^32-2 ((uid_t)-1 means "unchanged" to the kernel, 0 is root). */
static uint32_t id(const char *s, const char *what) {
    uint64_t v = number(s, 0xfffffffeULL, what);
    if (v == 0) die(what, "refusing to run as root");
    return (uint32_t)v;
}

static const char *abs_path(const char *p, const char *what) {
    size_t n = strlen(p);
    if (p[0] != '/' || n < 2 || n >= PATH_MAX || p[n - 1] == '/') die(what, "not a clean absolute path");
    for (const char *c = p; c; c = strchr(c + 1, '/')) {
        const char *end = strchr(c + 1, '/');
        size_t len = end ? (size_t)(end - c - 1) : strlen(c + 1);
        if (len == 0 || (len == 1 && c[1] == '.') || (len == 2 && c[1] == '.' && c[2] == '.'))
            die(what, "'.', '..' or an empty component in the path");
    }
    return p;
}

static void parse(int argc, char **argv) {
    int have_uid = 0, have_gid = 0, i = 1;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(o, "--netns") == 0) { opt.netns = 1; continue; }
        if (v == NULL || strcmp(v, "--") == 0) die(o, "missing value");
        i++;
        if (strcmp(o, "--uid") == 0) { opt.uid = id(v, o); have_uid = 1; }
        else if (strcmp(o, "--gid") == 0) { opt.gid = id(v, o); have_gid = 1; }
        else if (strcmp(o, "--groups") == 0) {
            char buf[MAX_GROUPS * 11];
            if (strlen(v) >= sizeof(buf)) die(o, "too many groups");
            strcpy(buf, v);
            for (char *g = buf, *next; g; g = next) {
                if ((next = strchr(g, ',')) != NULL) *next++ = '\0';
                if (opt.ngroups == MAX_GROUPS) die(o, "too many groups");
                opt.groups[opt.ngroups++] = id(g, o);
            }
        } else if (strcmp(o, "--cgroup") == 0) {
            if (opt.ncgroups == MAX_ITEMS) die(o, "too many");
            opt.cgroups[opt.ncgroups++] = abs_path(v, o);
        } else if (strcmp(o, "--root") == 0) opt.root = abs_path(v, o);
        else if (strcmp(o, "--ro") == 0 || strcmp(o, "--rw") == 0 || strcmp(o, "--dev") == 0) {
            if (opt.nbinds == MAX_ITEMS) die(o, "too many");
            enum kind k = o[2] == 'd' ? DEV : o[3] == 'o' ? RO : RW;
            opt.binds[opt.nbinds++] = (struct bind){k, abs_path(v, o)};
        } else if (strcmp(o, "--fsize") == 0) opt.fsize = number(v, UINT64_MAX - 1, o);
        else if (strcmp(o, "--nofile") == 0) opt.nofile = number(v, 1 << 20, o);
        else if (strcmp(o, "--keep-fds") == 0) opt.keep_fds = (unsigned)number(v, 1024, o);
        else die(o, "unknown option");
    }
    if (!have_uid || !have_gid) die("--uid and --gid", "required");
    if (opt.root == NULL) die("--root", "required");
    if (i + 1 >= argc || argv[i + 1][0] != '/') die("command", "missing '-- /absolute/command'");
    opt.cmd = &argv[i + 1];
    if (opt.nofile < 3 + opt.keep_fds) die("--nofile", "below the kept fds");
    for (unsigned fd = 3; fd < 3 + opt.keep_fds; fd++)
        if (fcntl((int)fd, F_GETFD) < 0) die("--keep-fds", "a kept fd is not open");
}

/* Open a path without following any symlink; O_PATH, close-on-exec. */
static int open_nofollow(const char *path) {
    struct open_how how = {.flags = O_PATH | O_CLOEXEC,
                           .resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS};
    int fd = (int)syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof(how));
    if (fd < 0) fail(path);
    return fd;
}

static void check_root(int fd, struct stat *st) {
    if (fstat(fd, st) < 0) fail(opt.root);
    if (!S_ISDIR(st->st_mode) || st->st_uid != 0 || (st->st_mode & 022))
        die(opt.root, "not a root-owned directory others cannot write");
    int dfd = openat(fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = dfd < 0 ? NULL : fdopendir(dfd);
    if (d == NULL) fail(opt.root);
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) die(opt.root, "not empty");
    closedir(d);
}

static void mount_or_die(const char *src, const char *dst, const char *type, unsigned long flags,
                         const char *data) {
    if (mount(src, dst, type, flags, data) < 0) fail(dst);
}

static char *fd_path(int fd) {
    static char buf[64];
    snprintf(buf, sizeof(buf), "/proc/self/fd/%d", fd);
    return buf;
}

/* Create the parents of "." + path in the new root (cwd), then a mount point of the right type. */
static void make_mount_point(const char *path, int is_dir) {
    char buf[PATH_MAX];
    snprintf(buf, sizeof(buf), ".%s", path);
    for (char *s = strchr(buf + 2, '/'); s; s = strchr(s + 1, '/')) {
        *s = '\0';
        if (mkdir(buf, 0755) < 0 && errno != EEXIST) fail(path);
        *s = '/';
    }
    int r = is_dir ? mkdir(buf, 0755) : mknod(buf, S_IFREG | 0644, 0);
    if (r < 0 && errno != EEXIST) fail(path);
}

/* Bind what path names (checked: no symlinks, the right type) at the same path, then set its flags. */
static void bind(const char *path, enum kind kind) {
    int fd = open_nofollow(path);
    struct stat st;
    if (fstat(fd, &st) < 0) fail(path);
    if (kind == DEV ? !S_ISCHR(st.st_mode) : !(S_ISREG(st.st_mode) || S_ISDIR(st.st_mode)))
        die(path, kind == DEV ? "not a character device" : "not a file or directory");
    make_mount_point(path, S_ISDIR(st.st_mode));
    char dst[PATH_MAX];
    snprintf(dst, sizeof(dst), ".%s", path);
    mount_or_die(fd_path(fd), dst, NULL, MS_BIND, NULL);
    unsigned long flags = kind == RO ? MS_RDONLY | MS_NOSUID | MS_NODEV
                        : kind == RW ? MS_NOSUID | MS_NODEV | MS_NOEXEC
                                     : MS_NOSUID | MS_NOEXEC;
    mount_or_die(NULL, dst, NULL, MS_REMOUNT | MS_BIND | flags, NULL);
    close(fd);
}

/* The host's merged-/usr links (e.g. /lib64 -> usr/lib64, where the dynamic loader is). */
static void usr_links(void) {
    static const char *const names[] = {"bin", "sbin", "lib", "lib32", "lib64", "libx32"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char host[16], target[64];
        snprintf(host, sizeof(host), "/%s", names[i]);
        ssize_t n = readlink(host, target, sizeof(target) - 1);
        if (n < 0) continue; /* absent, or a real directory: nothing QEMU reaches through it */
        target[n] = '\0';
        if (strncmp(target, "usr/", 4) != 0 && strncmp(target, "/usr/", 5) != 0) continue;
        if (symlinkat(target, AT_FDCWD, host + 1) < 0) fail(host);
    }
}

static void build_root(void) {
    struct stat checked, st;
    int rootfd = open_nofollow(opt.root);
    check_root(rootfd, &checked);
    close(rootfd);
    /* its own mounts, SysV IPC (no segments that outlive it or reach the host's), hostname and
     * cgroup view; a network namespace unless it is a build VM */
    if (unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP | (opt.netns ? CLONE_NEWNET : 0)) < 0)
        fail("unshare");
    mount_or_die(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL);
    /* mounts need a path in this namespace: open the root again, check it is the same directory */
    rootfd = open_nofollow(opt.root);
    if (fstat(rootfd, &st) < 0 || st.st_dev != checked.st_dev || st.st_ino != checked.st_ino)
        die(opt.root, "changed while the jail was set up");
    mount_or_die("ember-jail", fd_path(rootfd), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, ROOT_TMPFS);
    close(rootfd);
    rootfd = open_nofollow(opt.root); /* now the tmpfs */
    struct statfs sf;
    if (fstatfs(rootfd, &sf) < 0 || sf.f_type != TMPFS_MAGIC) die(opt.root, "the new root is not mounted there");
    if (fchdir(rootfd) < 0) fail(opt.root);
    close(rootfd);
    bind("/usr", RO);
    bind("/dev/null", DEV);
    bind("/dev/zero", DEV);
    bind("/dev/urandom", DEV);
    for (size_t i = 0; i < opt.nbinds; i++) bind(opt.binds[i].path, opt.binds[i].kind);
    usr_links();
    if (syscall(SYS_pivot_root, ".", ".") < 0) fail("pivot_root");
    if (umount2(".", MNT_DETACH) < 0) fail("detaching the old root");
    if (chdir("/") < 0) fail("chdir /");
    mount_or_die(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
}

int main(int argc, char **argv) {
    parse(argc, argv);
    umask(022); /* the daemon's 077 would make the root's directories untraversable for the uid */
    for (size_t i = 0; i < opt.ncgroups; i++) {
        int fd = open(opt.cgroups[i], O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 || write(fd, "0\n", 2) != 2) fail(opt.cgroups[i]);
        close(fd);
    }
    build_root();
    struct rlimit core = {0, 0}, fsize = {opt.fsize, opt.fsize}, nofile = {opt.nofile, opt.nofile};
    if (setrlimit(RLIMIT_CORE, &core) < 0 || setrlimit(RLIMIT_FSIZE, &fsize) < 0 ||
        setrlimit(RLIMIT_NOFILE, &nofile) < 0)
        fail("setrlimit");
    if (setgroups(opt.ngroups, opt.groups) < 0) fail("setgroups");
    if (setresgid(opt.gid, opt.gid, opt.gid) < 0) fail("setresgid");
    if (setresuid(opt.uid, opt.uid, opt.uid) < 0) fail("setresuid");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) fail("PR_SET_NO_NEW_PRIVS");
    /* No transparent huge pages: a clone's private copies of template pages stay 4 KiB (~3 MiB
     * less Pss per idle clone, measured); inherited across exec. */
    if (prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) < 0) fail("PR_SET_THP_DISABLE");
    umask(077);
    if (close_range(3 + opt.keep_fds, ~0U, 0) < 0) fail("close_range");
    char *envp[] = {NULL};
    execve(opt.cmd[0], opt.cmd, envp);
    fail(opt.cmd[0]);
}
