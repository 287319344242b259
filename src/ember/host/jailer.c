/*
 * ember-jailer: start a VMM with no privileges. Run as root by the daemon:
 *
 *   ember-jailer UID GID EXTRA_GID DIR NETNS CGROUP_PROCS... -- /abs/qemu ARGS...
 *
 * In order: join each cgroup (write 0 to its cgroup.procs), optionally enter a
 * fresh network namespace (NETNS=1: the VMM gets no network at all), set
 * resource limits, drop every group but GID and EXTRA_GID (0 = none), switch
 * to UID, forbid regaining privileges, chdir into DIR with umask 077, and exec
 * with an empty environment. Any failure exits 111 with a message on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

static void fail(const char *what) {
    fprintf(stderr, "ember-jailer: %s: %s\n", what, strerror(errno));
    exit(111);
}

int main(int argc, char **argv) {
    if (argc < 8) { fprintf(stderr, "usage: ember-jailer UID GID EXTRA_GID DIR NETNS CGROUP_PROCS... -- CMD...\n"); return 111; }
    uid_t uid = (uid_t)strtoul(argv[1], NULL, 10);
    gid_t gids[2] = {(gid_t)strtoul(argv[2], NULL, 10), (gid_t)strtoul(argv[3], NULL, 10)};
    const char *dir = argv[4];
    int netns = atoi(argv[5]);
    int i = 6;
    if (uid == 0 || gids[0] == 0) { errno = EPERM; fail("refusing to run a VMM as root"); }
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        int fd = open(argv[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0\n", 2) != 2) fail(argv[i]);
        close(fd);
    }
    if (i + 1 >= argc || argv[i + 1][0] != '/') { errno = EINVAL; fail("missing '-- /absolute/command'"); }
    char **cmd = &argv[i + 1];
    if (netns && unshare(CLONE_NEWNET) < 0) fail("unshare(CLONE_NEWNET)");
    struct rlimit core = {0, 0}, nofile = {4096, 4096};
    if (setrlimit(RLIMIT_CORE, &core) < 0 || setrlimit(RLIMIT_NOFILE, &nofile) < 0) fail("setrlimit");
    if (setgroups(gids[1] ? 2 : 1, gids) < 0) fail("setgroups");
    if (setresgid(gids[0], gids[0], gids[0]) < 0) fail("setresgid");
    if (setresuid(uid, uid, uid) < 0) fail("setresuid");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) fail("PR_SET_NO_NEW_PRIVS");
    if (chdir(dir) < 0) fail(dir);
    umask(077);
    close_range(3, ~0U, 0);
    char *envp[] = {NULL};
    execve(cmd[0], cmd, envp);
    fail(cmd[0]);
    return 111;
}
