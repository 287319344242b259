/*
 * ember-agent: Ember's guest agent. Runs as PID 1 of every micro-VM.
 *
 * Stage 1 (from Ember's initramfs): mount /dev, load the virtio modules listed
 * in /ember/modules, mount the root disk, move into it (the initramfs is
 * freed; this process keeps running from memory, so nothing is ever copied
 * into the image).
 * Stage 2: mount the API filesystems, bring up lo, reap every orphan, and
 * serve the host over the virtio-serial port "org.ember.agent".
 * Build mode (ember.build=1 on the kernel command line, image builds only):
 * the root disk is mounted at /newroot but not entered; commands run chrooted
 * into it (T_ROOT), and Ember's own tools (busybox in the build initramfs) run
 * there without being part of the image (T_TOOL: opened before the chroot).
 * The root disk is mounted only at the first RESTORE, not at boot: a build VM is
 * usually a restored snapshot of a builder that booted with a blank placeholder
 * disk of the same size, and the disk behind the device is now the build's.
 *
 * Wire protocol: see src/ember/guest/protocol.py (the constants below mirror
 * it). Single-threaded poll loop; output to the host is bounded (OUT_CAP) and
 * producers (child pipes, file reads, directory listings) are only read while
 * there is room, so a slow host back-pressures the guest instead of growing
 * memory. Exec stdin is credit-based: the host may have at most STDIN_WINDOW
 * bytes in flight; CREDIT frames return what was written to the command.
 *
 * The token (trust on first use): it is on no command line (the host's ps shows QEMU's
 * -append; guest users read /proc/cmdline). A cold-booted agent starts without one and
 * takes exactly one SET_TOKEN from its virtio-serial port, which only the host writes to
 * (guest processes cannot: the port is this process's, and none runs before the host is
 * authenticated: the agent starts nothing by itself). Every later SET_TOKEN is refused; the
 * token then changes only through an authenticated RESTORE (NEW_TOKEN), which the host sends
 * on every restore. It lives only in this process's memory: not in a file, the environment,
 * or a child (each exec replaces the forked copy of this memory before any image code runs).
 * HELLO with any other token (or before one is set) gets HELLO_NAK with the host's nonce.
 *
 * Idle control: the same binary, copied at boot to IDLE_BIN (a read-only tmpfs, last on exec's default PATH),
 * is the guest command `ember-idle hold|release|suspend|status` when run under that name. It only creates or
 * removes a file in IDLE_DIR (a small tmpfs any guest user may write); IDLE_QUERY answers the host with two
 * flags (HOLD: the file "hold" exists; SUSPEND_NOW: a "suspend" file existed, consumed by the answer). The
 * host's idle scheduler asks; a guest can only keep itself awake or ask to be suspended sooner.
 *
 * Restores: every identity step (RESTORE) rewrites GENERATION_FILE (on a
 * tmpfs, world-readable, fixed width, in place) with a new counter and random
 * id, so apps can tell they were cloned or resumed and regenerate secrets.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/random.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <grp.h>
#include <time.h>
#include <unistd.h>

#define MAX_PAYLOAD (256 * 1024)
#define HDR 12
#define CHUNK (64 * 1024)
#define OUT_CAP (4 * 1024 * 1024)
#define OUT_RESERVE (512 * 1024) /* kept free for control replies */
#define IN_CAP (MAX_PAYLOAD + HDR)
#define MAX_SESS 256
#define MAX_ORPHANS 1024
#define STDIN_WINDOW (1024 * 1024) /* stdin bytes the host may send beyond what was credited back */
#define CREDIT_BATCH (64 * 1024)
#define TCP_WINDOW (256 * 1024) /* bytes the host may send a TCP relay beyond what was credited back */
#define TCP_CREDIT_MAX (16 * 1024 * 1024) /* the most unsent credit the host may grant one relay */
#define LIST_DEFAULT_LIMIT 100000
#define TOKEN_MIN 16 /* bytes of an agent token: TOKEN_MIN .. sizeof token */
#define MAX_ID 4294967294ull /* (uid_t)-1 means "unchanged" to setuid: never a real id */
#define GENERATION_DIR "/run/ember"
#define GENERATION_FILE GENERATION_DIR "/generation"
#define PORT_NAME "org.ember.agent"
#define IDLE_DIR GENERATION_DIR "/idle"
#define IDLE_BIN_DIR GENERATION_DIR "/bin"
#define IDLE_BIN IDLE_BIN_DIR "/ember-idle"
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:" IDLE_BIN_DIR

#define MAX_PROCS 64 /* background processes tracked (exec with T_DETACH): running, or exited until evicted */
#define PROC_CMD_MAX 256 /* bytes of a background process's command line kept for PS */
#define PTY_MAX_DIM 1000 /* rows and columns of a PTY: 1 .. PTY_MAX_DIM */

enum { M_HELLO = 1, M_EXEC, M_STDIN, M_STDIN_EOF, M_SIGNAL, M_WRITE, M_WDATA, M_WEOF,
       M_READ, M_LIST, M_RESTORE, M_SYNC, M_PING, M_PROBE, M_SET_TOKEN,
       M_TCP_CONNECT = 16, M_TCP_SEND, M_TCP_SHUT, M_TCP_CREDIT,
       M_RESIZE = 20, M_PS, M_KILL, M_LOGS = 24, M_IDLE_QUERY = 28 };
enum { G_HELLO_ACK = 64, G_OK, G_ERROR, G_STDOUT, G_STDERR, G_EXIT, G_RDATA, G_REOF, G_STARTED, G_CREDIT,
       G_HELLO_NAK, G_TCP_CONNECTED = 75, G_TCP_RECV, G_TCP_EOF, G_PROC = 80, G_LOGDATA = 85, G_IDLE_STATE = 90 };
enum { T_ARG = 1, T_ENV, T_CWD, T_USER, T_TIMEOUT_MS, T_PATH, T_MODE, T_TOKEN, T_NONCE,
       T_ENTROPY, T_TIME_NS, T_HOSTNAME, T_NEW_TOKEN, T_STDIN, T_SIGNAL, T_ERRNO = 17,
       T_MESSAGE, T_EXIT_CODE, T_EXIT_SIGNAL, T_TIMED_OUT, T_PID, T_SIZE, T_MKDIRS, T_ROOT,
       T_TOOL, T_PORT, T_HTTP, T_LIMIT, T_TRUNCATED, T_CLOSED,
       T_PTY = 45, T_ROWS, T_COLS, T_DETACH, T_RUNNING,
       T_APPLOG = 50, T_LOG_FROM, T_LOG_END, T_LOG_WAIT_MS, T_LOG_DATA,
       T_HOLD = 55, T_SUSPEND_NOW };
/* app hooks (protocol.py: Msg.HOOK, Tag.HOOK_*) */
enum { M_HOOK = 30 };
enum { T_HOOK_NAME = 60, T_HOOK_BODY, T_HOOK_ANSWER };
#define HOOK_BODY_MAX (64 * 1024) /* a hook request's body (the host sends at most its run payload limit) */
#define HOOK_ANSWER_MAX 4096      /* the head of a hook's answer kept for the host: status line, headers, body start */
#define HOOK_NAME_MAX 32
#define HOOK_PATH_MAX 128 /* a hook's own path (T_PATH), as the host sends it */
#define HOOK_TIMEOUT_MAX_MS 3600000ull

enum kind { S_FREE = 0, S_EXEC, S_WRITE, S_READ, S_LIST, S_HOOK, S_LOGWAIT, S_TCP };

struct sess {
    enum kind kind;
    uint32_t stream;
    /* exec */
    pid_t pid;
    int out_fd, err_fd, in_fd;
    char *pending; size_t pending_len; int stdin_eof;
    uint64_t credit_owed; int stdin_closed; int closed_told;
    int64_t deadline_ms; int timed_out; int exited; int status;
    int pty; /* out_fd is a PTY master (in_fd a duplicate of it); no stderr */
    /* file */
    int fd; uint64_t bytes;
    /* listing */
    DIR *dir; uint64_t limit, count;
    /* tcp relay (fd: the socket; pending, stdin_eof, credit_owed, stdin_closed: as exec stdin) */
    int connecting, rd_eof, wr_shut; uint64_t tx_credit; uint16_t port;
    /* hook: fd is the socket; phase 0 connecting, 1 sending, 2 reading */
    char *req; size_t req_len, req_off; char *ans; size_t ans_len; int phase; unsigned hook_port;
    /* log read: from (offset), limit (bytes), deadline_ms */
    uint64_t from;
};

static struct sess sessions[MAX_SESS];

/* Background processes (exec with T_DETACH): the only ones PS lists and KILL signals. */
struct proc { pid_t pid; int running; int status; uint64_t started_ns; char cmd[PROC_CMD_MAX]; };
static struct proc procs[MAX_PROCS];
static int orphans[MAX_ORPHANS];
static int n_orphans;
static int port = -1;
static int connected;
static int authed;
static char token[128];
static size_t token_len; /* 0 until the host's one SET_TOKEN */
static unsigned char inbuf[IN_CAP];
static size_t in_len;
static unsigned char *outbuf;
static size_t out_head, out_len;
static int build_mode;
static int build_root_mounted;
static char root_dev[64] = "/dev/vda";

/* ---------- the app's log ----------
 * The app (an EXEC with T_APPLOG: the image's ENTRYPOINT/CMD, started once when the image is
 * built) writes its stdout and stderr into a ring the agent keeps: the newest `cap` bytes of
 * everything it wrote, `end` counting every byte since it started. The ring is guest memory,
 * so every snapshot holds it: each clone starts with the app's startup output and keeps its own
 * log from then on, and it survives suspend/resume. The agent reads the app's pipes whether or
 * not a host is attached (the app never waits on a host that does not read: old bytes are
 * overwritten instead); while the build's exec stream is attached, the output also goes there.
 * LOGS reads at most CHUNK bytes from an offset, waiting up to LOG_WAIT_MAX_MS for new output. */
#define LOG_MIN (4 * 1024ull)
#define LOG_MAX (64 * 1024 * 1024ull)
#define LOG_WAITERS 16 /* log reads waiting for output at once */
#define LOG_WAIT_MAX_MS 30000

struct ring { unsigned char *buf; uint64_t cap, end; };

static void ring_put(struct ring *r, const unsigned char *d, size_t n) {
    if (n > r->cap) { d += n - r->cap; r->end += n - r->cap; n = (size_t)r->cap; }
    size_t at = (size_t)(r->end % r->cap), first = n < r->cap - at ? n : (size_t)(r->cap - at);
    memcpy(r->buf + at, d, first);
    memcpy(r->buf, d + first, n - first);
    r->end += n;
}

/* Copies at most max bytes from *from on; *from is raised to the oldest byte still held
 * (and lowered to end if past it). Returns the number of bytes copied. */
static size_t ring_get(const struct ring *r, uint64_t *from, unsigned char *out, size_t max) {
    uint64_t oldest = r->end > r->cap ? r->end - r->cap : 0;
    if (*from < oldest) *from = oldest;
    if (*from > r->end) *from = r->end;
    size_t n = r->end - *from < max ? (size_t)(r->end - *from) : max;
    if (!n) return 0;
    size_t at = (size_t)(*from % r->cap), first = n < r->cap - at ? n : (size_t)(r->cap - at);
    memcpy(out, r->buf + at, first);
    memcpy(out + first, r->buf, n - first);
    return n;
}

static struct ring applog; /* cap 0: this VM has no app */
static int applog_fd[2] = {-1, -1}; /* the app's stdout and stderr pipes */
static uint32_t applog_stream; /* the exec stream that also gets the output (0: none) */

static void logmsg(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("ember-agent: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void die(const char *what) {
    logmsg("fatal: %s: %s", what, strerror(errno));
    sync();
    reboot(RB_POWER_OFF);
    _exit(1);
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---------- output buffer ---------- */

static size_t out_free(void) { return OUT_CAP - out_len; }

static int out_frame(uint32_t stream, uint8_t type, const void *a, size_t alen,
                     const void *b, size_t blen) {
    size_t total = HDR + alen + blen;
    if (!connected || alen + blen > MAX_PAYLOAD) return -1;
    if (total > out_free()) return -1;
    if (out_head + out_len + total > OUT_CAP) { /* compact */
        memmove(outbuf, outbuf + out_head, out_len);
        out_head = 0;
    }
    unsigned char *p = outbuf + out_head + out_len;
    uint32_t len = (uint32_t)(alen + blen);
    memcpy(p, &len, 4);
    memcpy(p + 4, &stream, 4);
    p[8] = type; p[9] = p[10] = p[11] = 0;
    if (alen) memcpy(p + HDR, a, alen);
    if (blen) memcpy(p + HDR + alen, b, blen);
    out_len += total;
    return 0;
}

static int producers_may_run(void) { return connected && out_free() >= CHUNK + HDR + OUT_RESERVE; }

/* ---------- TLV ---------- */

struct tlvbuf { unsigned char data[8192]; size_t len; };

static void tlv_put(struct tlvbuf *b, uint8_t tag, const void *v, uint32_t len) {
    if (b->len + 5 + len > sizeof(b->data)) return;
    b->data[b->len] = tag;
    memcpy(b->data + b->len + 1, &len, 4);
    memcpy(b->data + b->len + 5, v, len);
    b->len += 5 + len;
}

static void tlv_u64(struct tlvbuf *b, uint8_t tag, uint64_t v) { tlv_put(b, tag, &v, 8); }

/* Find the n-th field with this tag; returns length or -1. */
static long tlv_get(const unsigned char *p, size_t n, uint8_t tag, int index, const unsigned char **val) {
    size_t pos = 0;
    while (pos + 5 <= n) {
        uint32_t len;
        memcpy(&len, p + pos + 1, 4);
        if (len > n - pos - 5) return -1;
        if (p[pos] == tag && index-- == 0) { *val = p + pos + 5; return len; }
        pos += 5 + len;
    }
    return -1;
}

static uint64_t tlv_u(const unsigned char *p, size_t n, uint8_t tag, uint64_t dflt) {
    const unsigned char *v; long l = tlv_get(p, n, tag, 0, &v);
    uint64_t out = 0;
    if (l <= 0 || l > 8) return dflt;
    memcpy(&out, v, (size_t)l);
    return out;
}

/* Copies a string field into a fresh NUL-terminated buffer (caller frees). */
static char *tlv_str(const unsigned char *p, size_t n, uint8_t tag, int index) {
    const unsigned char *v; long l = tlv_get(p, n, tag, index, &v);
    if (l < 0) return NULL;
    char *s = malloc((size_t)l + 1);
    if (!s) return NULL;
    memcpy(s, v, (size_t)l);
    s[l] = 0;
    return s;
}

static void reply_ok(uint32_t stream, struct tlvbuf *b) {
    out_frame(stream, G_OK, b ? b->data : NULL, b ? b->len : 0, NULL, 0);
}

static void reply_err(uint32_t stream, int err, const char *fmt, ...) {
    struct tlvbuf b = {.len = 0};
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    tlv_u64(&b, T_ERRNO, (uint64_t)err);
    tlv_put(&b, T_MESSAGE, msg, (uint32_t)strlen(msg));
    out_frame(stream, G_ERROR, b.data, b.len, NULL, 0);
}

/* ---------- sessions ---------- */

static struct sess *sess_find(uint32_t stream) {
    for (int i = 0; i < MAX_SESS; i++)
        if (sessions[i].kind != S_FREE && sessions[i].stream == stream) return &sessions[i];
    return NULL;
}

static struct sess *sess_new(uint32_t stream, enum kind k) {
    if (stream == 0 || sess_find(stream)) return NULL;
    for (int i = 0; i < MAX_SESS; i++)
        if (sessions[i].kind == S_FREE) {
            memset(&sessions[i], 0, sizeof sessions[i]);
            sessions[i].kind = k;
            sessions[i].stream = stream;
            sessions[i].out_fd = sessions[i].err_fd = sessions[i].in_fd = sessions[i].fd = -1;
            return &sessions[i];
        }
    return NULL;
}

/* A pipe whose reader no longer cares: keep draining it so background
 * processes never die of SIGPIPE, until they close it. */
static void orphan_fd(int fd) {
    if (fd < 0) return;
    if (n_orphans < MAX_ORPHANS) orphans[n_orphans++] = fd;
    else close(fd);
}

static void sess_free(struct sess *s) {
    if (s->kind == S_EXEC && s->stream == applog_stream) applog_stream = 0;
    orphan_fd(s->out_fd);
    orphan_fd(s->err_fd);
    if (s->in_fd >= 0) close(s->in_fd);
    if (s->fd >= 0) close(s->fd);
    if (s->dir) closedir(s->dir);
    free(s->pending);
    free(s->req);
    free(s->ans);
    memset(s, 0, sizeof *s);
}

/* ---------- user lookup (the image's /etc/passwd, no NSS) ---------- */

struct ident { uid_t uid; gid_t gid; char home[256]; char shell[256]; };

/* A decimal id 0..MAX_ID: 1; digits out of range: -1; anything else: 0. */
static int parse_id(const char *s, uint64_t *out) {
    uint64_t v = 0;
    if (!*s) return 0;
    for (const char *c = s; *c; c++) {
        if (*c < '0' || *c > '9') return 0;
        v = v * 10 + (uint64_t)(*c - '0');
        if (v > MAX_ID) return -1;
    }
    *out = v;
    return 1;
}

/* 0: found; -1: unknown user or bad group; -2: an id out of range. */
static int lookup_user(const char *root, const char *spec, struct ident *id) {
    char name[128] = "", *colon;
    id->uid = 0; id->gid = 0; strcpy(id->home, "/root"); strcpy(id->shell, "/bin/sh");
    if (!spec || !*spec) return 0;
    snprintf(name, sizeof name, "%s", spec);
    colon = strchr(name, ':');
    if (colon) *colon++ = 0;
    uint64_t numeric = 0;
    int by_id = parse_id(name, &numeric);
    if (by_id < 0) return -2;
    char passwd[4200];
    snprintf(passwd, sizeof passwd, "%s/etc/passwd", root ? root : "");
    FILE *f = fopen(passwd, "re");
    int found = 0;
    if (f) {
        char line[1024];
        while (fgets(line, sizeof line, f)) {
            char *fields[7]; int nf = 0; char *save, *tok = line;
            for (; nf < 7; nf++) { fields[nf] = strsep(&tok, ":"); if (!fields[nf]) break; }
            if (nf < 6) continue;
            (void)save;
            uint64_t uid, gid;
            if (parse_id(fields[2], &uid) != 1 || parse_id(fields[3], &gid) != 1) continue;
            if ((by_id && uid == numeric) || (!by_id && strcmp(fields[0], name) == 0)) {
                id->uid = (uid_t)uid;
                id->gid = (gid_t)gid;
                snprintf(id->home, sizeof id->home, "%s", fields[5]);
                if (nf == 7) { /* the login shell, if the entry names one */
                    fields[6][strcspn(fields[6], "\r\n")] = 0;
                    if (fields[6][0] == '/') snprintf(id->shell, sizeof id->shell, "%s", fields[6]);
                }
                found = 1;
                break;
            }
        }
        fclose(f);
    }
    if (!found) {
        if (!by_id) return -1;
        id->uid = (uid_t)numeric; id->gid = (gid_t)numeric; strcpy(id->home, "/");
    }
    if (colon && *colon) {
        uint64_t g;
        int ok = parse_id(colon, &g);
        if (ok <= 0) return ok < 0 ? -2 : -1;
        id->gid = (gid_t)g;
    }
    return 0;
}

/* ---------- exec ---------- */

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* A free slot of the background table: an unused one, else the oldest exited; NULL when all run. */
static struct proc *proc_slot(void) {
    struct proc *oldest = NULL;
    for (int i = 0; i < MAX_PROCS; i++) {
        if (!procs[i].pid) return &procs[i];
        if (!procs[i].running && (!oldest || procs[i].started_ns < oldest->started_ns)) oldest = &procs[i];
    }
    return oldest;
}

static uint64_t realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* EXEC: pipes for stdout/stderr (and stdin with T_STDIN); or a pseudo-terminal (T_PTY, with
 * T_ROWS x T_COLS) as stdin, stdout and stderr, running the user's login shell without T_ARG;
 * or detached (T_DETACH): stdio on /dev/null, no session, tracked in the background table. */
static void do_exec(uint32_t stream, const unsigned char *p, size_t n) {
    char *argv[1024]; char *envp[1024]; int argc = 0, envc = 0;
    char *cwd = tlv_str(p, n, T_CWD, 0), *user = tlv_str(p, n, T_USER, 0), *root = tlv_str(p, n, T_ROOT, 0);
    char *path = NULL; /* what to execute when it is not argv[0] (the login shell) */
    int tool_fd = -1, master = -1;
    uint64_t timeout = tlv_u(p, n, T_TIMEOUT_MS, 0);
    int pty = (int)tlv_u(p, n, T_PTY, 0), detach = (int)tlv_u(p, n, T_DETACH, 0);
    int want_stdin = !detach && (pty || (int)tlv_u(p, n, T_STDIN, 0));
    uint64_t rows = tlv_u(p, n, T_ROWS, 24), cols = tlv_u(p, n, T_COLS, 80);
    uint64_t logcap = tlv_u(p, n, T_APPLOG, 0);
    unsigned char *logbuf = NULL;
    struct ident id;
    struct proc *bg = NULL;
    int outp[2] = {-1, -1}, errp[2] = {-1, -1}, inp[2] = {-1, -1}, failp[2] = {-1, -1};
    struct sess *s = NULL;

    while (argc < 1023 && (argv[argc] = tlv_str(p, n, T_ARG, argc))) argc++;
    argv[argc] = NULL;
    while (envc < 1023 && (envp[envc] = tlv_str(p, n, T_ENV, envc))) envc++;
    envp[envc] = NULL;
    if (argc == 0 && !pty) { reply_err(stream, EINVAL, "exec needs a command"); goto out; }
    if (pty && detach) { reply_err(stream, EINVAL, "a background process has no terminal"); goto out; }
    if (pty && (rows < 1 || rows > PTY_MAX_DIM || cols < 1 || cols > PTY_MAX_DIM)) {
        reply_err(stream, EINVAL, "a terminal has 1-%d rows and columns", PTY_MAX_DIM);
        goto out;
    }
    if (logcap && (pty || detach)) { reply_err(stream, EINVAL, "the app runs on pipes, not a terminal nor detached"); goto out; }
    if (logcap) {
        if (applog.cap) { reply_err(stream, EBUSY, "this VM's app is started already"); goto out; }
        if (logcap < LOG_MIN || logcap > LOG_MAX) { reply_err(stream, EINVAL, "an app log holds %llu-%llu bytes", LOG_MIN, LOG_MAX); goto out; }
        if (!(logbuf = malloc((size_t)logcap))) { reply_err(stream, ENOMEM, "no memory for the app's log"); goto out; }
    }
    if (root && (!*root || root[0] != '/')) { reply_err(stream, EINVAL, "root must be an absolute path"); goto out; }
    if (tlv_u(p, n, T_TOOL, 0) && (tool_fd = open(argv[0], O_PATH | O_CLOEXEC)) < 0) {
        reply_err(stream, errno, "no tool '%s' in this VM: %s", argv[0], strerror(errno));
        goto out;
    }
    int looked = lookup_user(root, user, &id);
    if (looked == -2) { reply_err(stream, EINVAL, "user '%s': uids and gids are 0-%llu", user, MAX_ID); goto out; }
    if (looked < 0) { reply_err(stream, EINVAL, "unknown user '%s' in the guest's /etc/passwd", user); goto out; }
    if (argc == 0) { /* the login shell: argv[0] is "-" and its name */
        path = strdup(access(id.shell, X_OK) == 0 ? id.shell : "/bin/sh");
        const char *base = path ? strrchr(path, '/') : NULL;
        if (!base || !(argv[0] = malloc(strlen(base) + 1))) { reply_err(stream, ENOMEM, "out of memory"); goto out; }
        sprintf(argv[0], "-%s", base + 1);
        argv[argc = 1] = NULL;
    }
    if (detach) {
        if (!(bg = proc_slot())) {
            reply_err(stream, EBUSY, "%d background processes are running: kill some first", MAX_PROCS);
            goto out;
        }
    } else if (!(s = sess_new(stream, S_EXEC))) {
        reply_err(stream, EBUSY, "too many concurrent sessions or stream reused");
        goto out;
    }
    if (pty) {
        struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
        if ((master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0 || grantpt(master) < 0 || unlockpt(master) < 0 ||
            ioctl(master, TIOCSWINSZ, &ws) < 0 || pipe2(failp, O_CLOEXEC)) {
            reply_err(stream, errno, "cannot open a terminal: %s", strerror(errno));
            goto fail;
        }
    } else if (pipe2(failp, O_CLOEXEC) ||
               (!detach && (pipe2(outp, O_CLOEXEC) || pipe2(errp, O_CLOEXEC))) ||
               (want_stdin && pipe2(inp, O_CLOEXEC))) {
        reply_err(stream, errno, "pipe: %s", strerror(errno));
        goto fail;
    }
    char slave_name[64] = "";
    if (pty && ptsname_r(master, slave_name, sizeof slave_name) != 0) {
        reply_err(stream, errno, "cannot name the terminal: %s", strerror(errno));
        goto fail;
    }
    pid_t pid = fork();
    if (pid < 0) { reply_err(stream, errno, "fork: %s", strerror(errno)); goto fail; }
    if (pid == 0) {
        sigset_t all; sigemptyset(&all); sigprocmask(SIG_SETMASK, &all, NULL);
        signal(SIGPIPE, SIG_DFL);
        setsid();
        int devnull = open("/dev/null", O_RDWR);
        if (pty) { /* the terminal becomes this new session's controlling terminal */
            int slave = open(slave_name, O_RDWR);
            if (slave < 0 || ioctl(slave, TIOCSCTTY, 0) < 0) {
                int msg[2] = {2, errno};
                if (write(failp[1], msg, sizeof msg) < 0) _exit(127);
                _exit(127);
            }
            if (fchown(slave, id.uid, (gid_t)-1) < 0) { /* the user's own terminal, as login makes it */ }
            dup2(slave, 0); dup2(slave, 1); dup2(slave, 2);
            if (slave > 2) close(slave);
        } else {
            dup2(want_stdin ? inp[0] : devnull, 0);
            dup2(detach ? devnull : outp[1], 1);
            dup2(detach ? devnull : errp[1], 2);
        }
        int err = 0;
        if (root && (chroot(root) < 0 || chdir("/") < 0)) err = errno;
        else if (cwd && *cwd && chdir(cwd) < 0) err = errno;
        else if (!(cwd && *cwd) && pty && chdir(id.home) < 0 && chdir("/") < 0) err = errno;
        else if (setgroups(1, &id.gid) < 0 || setgid(id.gid) < 0 || setuid(id.uid) < 0) err = errno;
        if (!err) {
            extern char **environ;
            environ = envp;
            if (!getenv("HOME")) setenv("HOME", id.home, 0);
            if (!getenv("PATH")) setenv("PATH", DEFAULT_PATH, 0);
            if (path) { setenv("SHELL", path, 0); execv(path, argv); }
            else if (tool_fd >= 0) syscall(SYS_execveat, tool_fd, "", argv, environ, AT_EMPTY_PATH);
            else execvp(argv[0], argv);
            err = errno;
        }
        int stage = (cwd && *cwd && access(cwd, X_OK) < 0) ? 1 : 2;
        int msg[2] = {stage, err};
        if (write(failp[1], msg, sizeof msg) < 0) _exit(127);
        _exit(127);
    }
    close(failp[1]); failp[1] = -1;
    if (outp[1] >= 0) { close(outp[1]); outp[1] = -1; }
    if (errp[1] >= 0) { close(errp[1]); errp[1] = -1; }
    if (inp[0] >= 0) { close(inp[0]); inp[0] = -1; }
    int msg[2];
    ssize_t got = read(failp[0], msg, sizeof msg);
    if (got == (ssize_t)sizeof msg) {
        waitpid(pid, NULL, 0);
        if (msg[0] == 1) reply_err(stream, msg[1], "cannot enter working directory '%s': %s", cwd, strerror(msg[1]));
        else reply_err(stream, msg[1], "cannot run '%s': %s", path ? path : argv[0], strerror(msg[1]));
        goto fail;
    }
    close(failp[0]); failp[0] = -1;
    struct tlvbuf b = {.len = 0};
    tlv_u64(&b, T_PID, (uint64_t)pid);
    if (detach) {
        memset(bg, 0, sizeof *bg);
        bg->pid = pid; bg->running = 1; bg->started_ns = realtime_ns();
        size_t used = 0;
        for (int i = 0; i < argc && used + 1 < sizeof bg->cmd; i++)
            used += (size_t)snprintf(bg->cmd + used, sizeof bg->cmd - used, i ? " %s" : "%s", argv[i]);
        out_frame(stream, G_STARTED, b.data, b.len, NULL, 0);
        goto out;
    }
    if (pty) {
        s->pty = 1; s->out_fd = master; master = -1;
        if ((s->in_fd = dup(s->out_fd)) < 0) { /* no stdin: the host is told at once */ s->stdin_closed = 1; }
        else { fcntl(s->in_fd, F_SETFD, FD_CLOEXEC); set_nonblock(s->in_fd); }
        set_nonblock(s->out_fd);
    } else {
        set_nonblock(outp[0]); set_nonblock(errp[0]);
        s->out_fd = outp[0]; s->err_fd = errp[0]; outp[0] = errp[0] = -1;
        if (want_stdin) { s->in_fd = inp[1]; inp[1] = -1; set_nonblock(s->in_fd); }
        if (logbuf) { /* the app: its pipes are the log's, for as long as anything holds them */
            applog.buf = logbuf; applog.cap = logcap; applog.end = 0; logbuf = NULL;
            applog_fd[0] = s->out_fd; applog_fd[1] = s->err_fd;
            s->out_fd = s->err_fd = -1;
            applog_stream = stream;
        }
    }
    s->pid = pid;
    s->deadline_ms = timeout ? now_ms() + (int64_t)timeout : 0;
    if (want_stdin) tlv_u64(&b, T_SIZE, STDIN_WINDOW);
    out_frame(stream, G_STARTED, b.data, b.len, NULL, 0);
    goto out;
fail:
    for (int i = 0; i < 2; i++) {
        if (outp[i] >= 0) close(outp[i]);
        if (errp[i] >= 0) close(errp[i]);
        if (inp[i] >= 0) close(inp[i]);
        if (failp[i] >= 0) close(failp[i]);
    }
    if (master >= 0) close(master);
    if (s) memset(s, 0, sizeof *s);
out:
    for (int i = 0; i < argc; i++) free(argv[i]);
    for (int i = 0; i < envc; i++) free(envp[i]);
    if (tool_fd >= 0) close(tool_fd);
    free(cwd); free(user); free(root); free(path);
    free(logbuf);
}

/* RESIZE of a PTY exec: the terminal's new size (its foreground processes get SIGWINCH). */
static void do_resize(struct sess *s, const unsigned char *p, size_t n) {
    uint64_t rows = tlv_u(p, n, T_ROWS, 0), cols = tlv_u(p, n, T_COLS, 0);
    if (!s->pty || s->out_fd < 0 || rows < 1 || rows > PTY_MAX_DIM || cols < 1 || cols > PTY_MAX_DIM) return;
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    ioctl(s->out_fd, TIOCSWINSZ, &ws);
}

/* PS: one G_PROC per background process, then OK. */
static void do_ps(uint32_t stream) {
    for (int i = 0; i < MAX_PROCS; i++) {
        struct proc *pr = &procs[i];
        if (!pr->pid) continue;
        struct tlvbuf b = {.len = 0};
        tlv_u64(&b, T_PID, (uint64_t)pr->pid);
        tlv_put(&b, T_ARG, pr->cmd, (uint32_t)strlen(pr->cmd));
        tlv_u64(&b, T_TIME_NS, pr->started_ns);
        tlv_u64(&b, T_RUNNING, (uint64_t)pr->running);
        if (!pr->running) {
            int code = WIFEXITED(pr->status) ? WEXITSTATUS(pr->status) : -1;
            tlv_u64(&b, T_EXIT_CODE, (uint64_t)(int64_t)code);
            tlv_u64(&b, T_EXIT_SIGNAL, WIFSIGNALED(pr->status) ? (uint64_t)WTERMSIG(pr->status) : 0);
        }
        out_frame(stream, G_PROC, b.data, b.len, NULL, 0);
    }
    reply_ok(stream, NULL);
}

/* KILL: signal a running background process (its whole process group: it leads its own session). */
static void do_kill(uint32_t stream, const unsigned char *p, size_t n) {
    uint64_t pid = tlv_u(p, n, T_PID, 0), sig = tlv_u(p, n, T_SIGNAL, SIGTERM);
    if (sig < 1 || sig > 64) { reply_err(stream, EINVAL, "signals are 1-64"); return; }
    for (int i = 0; pid && i < MAX_PROCS; i++)
        if (procs[i].running && (uint64_t)procs[i].pid == pid) {
            if (kill(-procs[i].pid, (int)sig) < 0 && kill(procs[i].pid, (int)sig) < 0) {
                reply_err(stream, errno, "kill: %s", strerror(errno));
                return;
            }
            reply_ok(stream, NULL);
            return;
        }
    reply_err(stream, ESRCH, "no background process %llu is running", (unsigned long long)pid);
}

/* Give the host back the stdin credit of what reached the command (in batches,
 * or all of it once nothing is pending), and tell it once when the command
 * closed its stdin. A full output buffer only delays this: serve() retries. */
static void send_credit(struct sess *s) {
    int tell_closed = s->stdin_closed && !s->closed_told;
    if (!tell_closed && (!s->credit_owed || (s->credit_owed < CREDIT_BATCH && s->pending_len))) return;
    struct tlvbuf b = {.len = 0};
    tlv_u64(&b, T_SIZE, s->credit_owed);
    if (tell_closed) tlv_u64(&b, T_CLOSED, 1);
    if (out_frame(s->stream, G_CREDIT, b.data, b.len, NULL, 0) < 0) return;
    s->credit_owed = 0;
    if (tell_closed) s->closed_told = 1;
}

static void flush_stdin(struct sess *s) {
    while (s->pending_len && s->in_fd >= 0) {
        ssize_t w = write(s->in_fd, s->pending, s->pending_len);
        if (w < 0) {
            if (errno == EAGAIN) break;
            if (errno == EINTR) continue;
            /* the command closed its stdin (EPIPE): like a pipe, the rest is not
             * delivered, and the host is told so it stops sending */
            close(s->in_fd); s->in_fd = -1;
            s->credit_owed += s->pending_len;
            s->pending_len = 0;
            s->stdin_closed = 1;
            break;
        }
        memmove(s->pending, s->pending + w, s->pending_len - (size_t)w);
        s->pending_len -= (size_t)w;
        s->credit_owed += (uint64_t)w;
    }
    if (!s->pending_len && s->stdin_eof && s->in_fd >= 0) { close(s->in_fd); s->in_fd = -1; }
    send_credit(s);
}

static void do_stdin(struct sess *s, const unsigned char *p, size_t n) {
    if (s->in_fd < 0) {
        if (s->stdin_closed) { s->credit_owed += n; send_credit(s); } /* in flight before CLOSED reached the host */
        return;
    }
    if (s->pending_len + n > STDIN_WINDOW) {
        /* the host sent beyond its credit: never drop stdin silently */
        logmsg("stdin beyond the granted credit on stream %u", s->stream);
        reply_err(s->stream, EOVERFLOW, "stdin arrived beyond the agent's credit; the command was killed");
        if (!s->exited) kill(-s->pid, SIGKILL);
        close(s->in_fd); s->in_fd = -1;
        return;
    }
    char *np = realloc(s->pending, s->pending_len + n);
    if (!np) {
        reply_err(s->stream, ENOMEM, "out of memory for stdin; the command was killed");
        if (!s->exited) kill(-s->pid, SIGKILL);
        close(s->in_fd); s->in_fd = -1;
        return;
    }
    s->pending = np;
    memcpy(s->pending + s->pending_len, p, n);
    s->pending_len += n;
    flush_stdin(s);
}

/* Read what a pipe has now; returns 1 on EOF/error, 0 otherwise. */
static int pump_pipe(struct sess *s, int *fd, uint8_t type) {
    char buf[CHUNK];
    while (*fd >= 0 && producers_may_run()) {
        ssize_t r = read(*fd, buf, sizeof buf);
        if (r > 0) { out_frame(s->stream, type, buf, (size_t)r, NULL, 0); continue; }
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
        close(*fd); *fd = -1;
        return 1;
    }
    return 0;
}

/* Read what the app wrote into its log (and to the build's stream while attached).
 * A pass reads at most 1 MiB of each pipe, so a flood cannot starve the host's requests. */
static void pump_applog(void) {
    static unsigned char buf[CHUNK];
    for (int i = 0; i < 2; i++) {
        for (int pass = 0; applog_fd[i] >= 0 && pass < 16; pass++) {
            int forward = applog_stream && authed;
            if (forward && !producers_may_run()) break;
            ssize_t r = read(applog_fd[i], buf, sizeof buf);
            if (r > 0) {
                ring_put(&applog, buf, (size_t)r);
                if (forward) out_frame(applog_stream, i ? G_STDERR : G_STDOUT, buf, (size_t)r, NULL, 0);
                continue;
            }
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
            close(applog_fd[i]); applog_fd[i] = -1; /* every writer is gone */
        }
    }
}

static void finish_exec_if_done(struct sess *s) {
    if (!s->exited) return;
    /* The main process is gone: send what its pipes already hold, then hand
     * them to the orphan drain (background children may still hold them). */
    if (!producers_may_run()) return;
    if (s->stream == applog_stream) pump_applog();
    pump_pipe(s, &s->out_fd, G_STDOUT);
    pump_pipe(s, &s->err_fd, G_STDERR);
    if (!producers_may_run()) return;
    struct tlvbuf b = {.len = 0};
    int code = WIFEXITED(s->status) ? WEXITSTATUS(s->status) : -1;
    tlv_u64(&b, T_EXIT_CODE, (uint64_t)(int64_t)code);
    tlv_u64(&b, T_EXIT_SIGNAL, WIFSIGNALED(s->status) ? (uint64_t)WTERMSIG(s->status) : 0);
    tlv_u64(&b, T_TIMED_OUT, (uint64_t)s->timed_out);
    out_frame(s->stream, G_EXIT, b.data, b.len, NULL, 0);
    sess_free(s);
}

static void reap(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_SESS; i++)
            if (sessions[i].kind == S_EXEC && sessions[i].pid == pid) {
                sessions[i].exited = 1;
                sessions[i].status = status;
            }
        for (int i = 0; i < MAX_PROCS; i++)
            if (procs[i].running && procs[i].pid == pid) { procs[i].running = 0; procs[i].status = status; }
    }
}

/* ---------- files ---------- */

/* The parents of path; those it makes belong to owner (NULL: root's). */
static int mkdirs(const char *path, const struct ident *owner) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, 0755) == 0) {
                if (owner && lchown(tmp, owner->uid, owner->gid) < 0) return -1;
            } else if (errno != EEXIST) return -1;
            *p = '/';
        }
    return 0;
}

static void do_write(uint32_t stream, const unsigned char *p, size_t n) {
    char *path = tlv_str(p, n, T_PATH, 0), *user = tlv_str(p, n, T_USER, 0);
    uint64_t mode = tlv_u(p, n, T_MODE, 0644);
    struct sess *s;
    struct ident id;
    if (!path || path[0] != '/') { reply_err(stream, EINVAL, "path must be absolute"); goto out; }
    int looked = lookup_user(NULL, user, &id);
    if (looked == -2) { reply_err(stream, EINVAL, "user '%s': uids and gids are 0-%llu", user, MAX_ID); goto out; }
    if (looked < 0) { reply_err(stream, EINVAL, "unknown user '%s' in the guest's /etc/passwd", user); goto out; }
    const struct ident *owner = user && *user ? &id : NULL;
    if (tlv_u(p, n, T_MKDIRS, 0) && mkdirs(path, owner) < 0) { reply_err(stream, errno, "cannot create parents of %s: %s", path, strerror(errno)); goto out; }
    if (!(s = sess_new(stream, S_WRITE))) { reply_err(stream, EBUSY, "too many concurrent sessions"); goto out; }
    /* never through a symlink in the last component (a guest user's link in a shared
     * directory would aim root's write anywhere), never into a FIFO or device */
    s->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, (mode_t)(mode & 07777));
    if (s->fd < 0 && errno == ELOOP) {
        reply_err(stream, ELOOP, "refusing to write %s: it is a symbolic link (copy to the path it points to)", path);
        memset(s, 0, sizeof *s);
        goto out;
    }
    if (s->fd < 0 && errno == ENXIO) { /* a FIFO nobody reads */
        reply_err(stream, EINVAL, "refusing to write %s: it is not a regular file", path);
        memset(s, 0, sizeof *s);
        goto out;
    }
    if (s->fd < 0) { reply_err(stream, errno, "cannot open %s for writing: %s", path, strerror(errno)); memset(s, 0, sizeof *s); goto out; }
    struct stat st;
    if (fstat(s->fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        reply_err(stream, EINVAL, "refusing to write %s: it is not a regular file", path);
        sess_free(s);
        goto out;
    }
    fcntl(s->fd, F_SETFL, fcntl(s->fd, F_GETFL) & ~O_NONBLOCK);
    if (owner && fchown(s->fd, owner->uid, owner->gid) < 0) {
        reply_err(stream, errno, "cannot give %s to '%s': %s", path, user, strerror(errno));
        sess_free(s);
        goto out;
    }
    fchmod(s->fd, (mode_t)(mode & 07777)); /* after the chown, which clears set-id bits */
    reply_ok(stream, NULL);
out:
    free(path); free(user);
}

static void do_wdata(struct sess *s, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t w = write(s->fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            reply_err(s->stream, errno, "write failed: %s", strerror(errno));
            sess_free(s);
            return;
        }
        p += w; n -= (size_t)w; s->bytes += (uint64_t)w;
    }
}

static void do_weof(struct sess *s) {
    struct tlvbuf b = {.len = 0};
    if (fsync(s->fd) < 0 && errno != EINVAL) { reply_err(s->stream, errno, "fsync failed: %s", strerror(errno)); sess_free(s); return; }
    tlv_u64(&b, T_SIZE, s->bytes);
    reply_ok(s->stream, &b);
    sess_free(s);
}

static void do_read(uint32_t stream, const unsigned char *p, size_t n) {
    char *path = tlv_str(p, n, T_PATH, 0);
    struct stat st;
    struct sess *s;
    if (!path || path[0] != '/') { reply_err(stream, EINVAL, "path must be absolute"); goto out; }
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) { reply_err(stream, errno, "cannot open %s: %s", path, strerror(errno)); goto out; }
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        reply_err(stream, S_ISDIR(st.st_mode) ? EISDIR : EINVAL, "%s is not a regular file", path);
        goto out;
    }
    if (!(s = sess_new(stream, S_READ))) { close(fd); reply_err(stream, EBUSY, "too many concurrent sessions"); goto out; }
    s->fd = fd;
    struct tlvbuf b = {.len = 0};
    tlv_u64(&b, T_SIZE, (uint64_t)st.st_size);
    reply_ok(stream, &b);
out:
    free(path);
}

static void pump_read(struct sess *s) {
    char buf[CHUNK];
    while (producers_may_run()) {
        ssize_t r = read(s->fd, buf, sizeof buf);
        if (r > 0) { out_frame(s->stream, G_RDATA, buf, (size_t)r, NULL, 0); s->bytes += (uint64_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) reply_err(s->stream, errno, "read failed: %s", strerror(errno));
        else {
            struct tlvbuf b = {.len = 0};
            tlv_u64(&b, T_SIZE, s->bytes);
            out_frame(s->stream, G_REOF, b.data, b.len, NULL, 0);
        }
        sess_free(s);
        return;
    }
}

static void do_list(uint32_t stream, const unsigned char *p, size_t n) {
    char *path = tlv_str(p, n, T_PATH, 0);
    uint64_t limit = tlv_u(p, n, T_LIMIT, LIST_DEFAULT_LIMIT);
    struct sess *s;
    DIR *d;
    if (!path || path[0] != '/') { reply_err(stream, EINVAL, "path must be absolute"); goto out; }
    if (!(d = opendir(path))) { reply_err(stream, errno, "cannot list %s: %s", path, strerror(errno)); goto out; }
    if (!(s = sess_new(stream, S_LIST))) { closedir(d); reply_err(stream, EBUSY, "too many concurrent sessions"); goto out; }
    s->dir = d;
    s->limit = limit;
out:
    free(path);
}

static struct dirent *next_entry(DIR *d) {
    struct dirent *e;
    while ((e = readdir(d)) && (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))) {}
    return e;
}

/* Entries go out in frames as the host takes them (so none is ever dropped on
 * a full buffer), at most s->limit of them; REOF says whether more were left out. */
static void pump_list(struct sess *s) {
    static unsigned char blob[CHUNK];
    while (producers_may_run()) {
        size_t len = 0;
        int done = 0, truncated = 0;
        while (len + 24 + 256 <= sizeof blob) { /* d_name is at most 255 bytes */
            errno = 0;
            struct dirent *e = next_entry(s->dir);
            if (!e) {
                if (errno) { reply_err(s->stream, errno, "listing failed: %s", strerror(errno)); sess_free(s); return; }
                done = 1;
                break;
            }
            if (s->count >= s->limit) { truncated = 1; done = 1; break; }
            struct stat st;
            if (fstatat(dirfd(s->dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) continue; /* gone meanwhile */
            uint32_t nl = (uint32_t)strlen(e->d_name);
            uint32_t mode = st.st_mode; uint64_t size = (uint64_t)st.st_size; int64_t mt = st.st_mtime;
            memcpy(blob + len, &nl, 4); memcpy(blob + len + 4, &mode, 4);
            memcpy(blob + len + 8, &size, 8); memcpy(blob + len + 16, &mt, 8);
            memcpy(blob + len + 24, e->d_name, nl);
            len += 24 + nl;
            s->count++;
        }
        if (len) out_frame(s->stream, G_RDATA, blob, len, NULL, 0);
        if (done) {
            struct tlvbuf b = {.len = 0};
            tlv_u64(&b, T_TRUNCATED, (uint64_t)truncated);
            out_frame(s->stream, G_REOF, b.data, b.len, NULL, 0);
            sess_free(s);
            return;
        }
    }
}

/* ---------- the app's log: reads ---------- */

static int log_waiters(void) {
    int n = 0;
    for (int i = 0; i < MAX_SESS; i++) n += sessions[i].kind == S_LOGWAIT;
    return n;
}

/* Every LOGS request is answered from the loop, when it has bytes past `from`
 * or its wait is over, and the output buffer has room for a whole chunk. */
static void do_logs(uint32_t stream, const unsigned char *p, size_t n) {
    uint64_t wait = tlv_u(p, n, T_LOG_WAIT_MS, 0);
    if (wait > LOG_WAIT_MAX_MS) wait = LOG_WAIT_MAX_MS;
    if (wait && log_waiters() >= LOG_WAITERS) { reply_err(stream, EBUSY, "too many log reads waiting in this VM"); return; }
    struct sess *s = sess_new(stream, S_LOGWAIT);
    if (!s) { reply_err(stream, EBUSY, "too many concurrent sessions or stream reused"); return; }
    s->from = tlv_u(p, n, T_LOG_FROM, 0);
    s->limit = tlv_u(p, n, T_LIMIT, CHUNK);
    if (s->limit > CHUNK) s->limit = CHUNK;
    s->deadline_ms = now_ms() + (int64_t)wait;
}

static int log_due(const struct sess *s, int64_t now) { return applog.end > s->from || now >= s->deadline_ms; }

static void answer_log(struct sess *s, int64_t now) {
    static unsigned char data[CHUNK];
    if (!log_due(s, now) || !producers_may_run()) return;
    uint64_t from = s->from;
    size_t len = applog.cap ? ring_get(&applog, &from, data, (size_t)s->limit) : 0;
    struct tlvbuf b = {.len = 0};
    tlv_u64(&b, T_LOG_FROM, applog.cap ? from : 0);
    tlv_u64(&b, T_LOG_END, applog.end);
    tlv_u64(&b, T_SIZE, applog.cap);
    uint32_t dl = (uint32_t)len;
    b.data[b.len] = T_LOG_DATA; memcpy(b.data + b.len + 1, &dl, 4); b.len += 5;
    out_frame(s->stream, G_LOGDATA, b.data, b.len, data, len);
    sess_free(s);
}

/* ---------- build mode: the root disk ---------- */

static int mount_at(const char *src, const char *dst, const char *type, unsigned long flags, const char *data) {
    mkdir(dst, 0755);
    return mount(src, dst, type, flags, data) < 0 && errno != EBUSY ? -1 : 0;
}

/* Drop every block the kernel holds of each virtio disk (BLKFLSBUF). A restored build VM
 * read its disks when the builder snapshot booted (the partition scan at probe time), and
 * those were the blank placeholders: the files behind the devices are the build's now. */
static const char *flush_disk_buffers(void) {
    static char dev[300];
    DIR *d = opendir("/sys/block");
    if (!d) return "/sys/block";
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "vd", 2) != 0) continue;
        snprintf(dev, sizeof dev, "/dev/%s", e->d_name);
        int fd = open(dev, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || ioctl(fd, BLKFLSBUF, 0) < 0) {
            int err = errno;
            if (fd >= 0) close(fd);
            closedir(d);
            errno = err;
            return dev;
        }
        close(fd);
    }
    closedir(d);
    return NULL;
}

/* Mount the root disk at /newroot with what a RUN step expects inside the image (Docker
 * provides the same). Returns NULL, or what failed (errno set). */
static const char *mount_build_root(void) {
    const char *failed = flush_disk_buffers();
    if (failed) return failed;
    if (mount_at(root_dev, "/newroot", "ext4", 0, NULL) < 0) return root_dev;
    if (mount_at("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) return "/newroot/proc";
    if (mount_at("sysfs", "/newroot/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) return "/newroot/sys";
    if (mount_at("devtmpfs", "/newroot/dev", "devtmpfs", MS_NOSUID, "mode=0755") < 0) return "/newroot/dev";
    if (mount_at("devpts", "/newroot/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,gid=5,mode=620,ptmxmode=666") < 0)
        return "/newroot/dev/pts";
    if (mount_at("tmpfs", "/newroot/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777") < 0) return "/newroot/dev/shm";
    /* DNS comes from the VMM's user-mode network; the image's own file stays underneath. */
    int fd = open("/ember/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, "nameserver 10.0.2.3\n", 20) != 20) {
        if (fd >= 0) close(fd);
        return "/ember/resolv.conf";
    }
    close(fd);
    struct stat st;
    if (lstat("/newroot/etc", &st) == 0 && S_ISDIR(st.st_mode)) {
        fd = open("/newroot/etc/resolv.conf", O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (fd >= 0) {
            close(fd);
            if (mount("/ember/resolv.conf", "/newroot/etc/resolv.conf", NULL, MS_BIND, NULL) < 0) logmsg("resolv.conf: %s", strerror(errno));
        }
    }
    return NULL;
}

/* ---------- identity after restore ---------- */

static uint64_t generation;
static int generation_fd = -1;

/* GENERATION_FILE = "<counter> <random id>\n", fixed width, rewritten in place by one pwrite on
 * every restore (one cheap syscall on the restore path: under TCG a fresh QEMU translates every
 * kernel path it meets, and create + rename cost ~20 ms there). A reader racing the write may
 * see a mix of the old and new lines: never the old line, which is all an app has to notice. */
static int write_generation(void) {
    unsigned char rnd[16];
    char line[64];
    if (generation_fd < 0) {
        generation_fd = open(GENERATION_FILE, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (generation_fd < 0 || fchmod(generation_fd, 0644) < 0) return -1;
    }
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) return -1;
    int len = snprintf(line, sizeof line, "%020llu ", (unsigned long long)++generation);
    for (size_t i = 0; i < sizeof rnd; i++) len += snprintf(line + len, sizeof line - (size_t)len, "%02x", rnd[i]);
    line[len++] = '\n';
    return pwrite(generation_fd, line, (size_t)len, 0) == len ? 0 : -1;
}

static void do_restore(uint32_t stream, const unsigned char *p, size_t n) {
    const unsigned char *v;
    long l = tlv_get(p, n, T_ENTROPY, 0, &v);
    if (l > 0 && l <= 512) {
        struct { int entropy_count; int buf_size; unsigned char buf[512]; } info;
        info.entropy_count = (int)l * 8;
        info.buf_size = (int)l;
        memcpy(info.buf, v, (size_t)l);
        int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
        if (fd < 0 || ioctl(fd, RNDADDENTROPY, &info) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0) {
            reply_err(stream, errno, "reseeding the kernel RNG failed: %s", strerror(errno));
            if (fd >= 0) close(fd);
            return;
        }
        close(fd);
    }
    uint64_t t = tlv_u(p, n, T_TIME_NS, 0);
    if (t) {
        struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull)};
        if (clock_settime(CLOCK_REALTIME, &ts) < 0) { reply_err(stream, errno, "setting the clock failed"); return; }
    }
    l = tlv_get(p, n, T_HOSTNAME, 0, &v);
    if (l > 0 && l < 64 && sethostname((const char *)v, (size_t)l) < 0) { reply_err(stream, errno, "sethostname failed"); return; }
    l = tlv_get(p, n, T_NEW_TOKEN, 0, &v);
    if (l >= 0 && (l < TOKEN_MIN || (size_t)l > sizeof token)) {
        reply_err(stream, EINVAL, "a new token must be %d-%zu bytes", TOKEN_MIN, sizeof token);
        return;
    }
    if (l > 0) { memcpy(token, v, (size_t)l); token_len = (size_t)l; }
    if (!build_mode && write_generation() < 0) {
        reply_err(stream, errno, "writing %s failed: %s", GENERATION_FILE, strerror(errno));
        return;
    }
    if (!build_mode) unlink(IDLE_DIR "/suspend"); /* asked of the VM that was saved, not of this one */
    if (build_mode && !build_root_mounted) {
        const char *failed = mount_build_root();
        if (failed) { reply_err(stream, errno, "the build VM could not mount %s: %s", failed, strerror(errno)); return; }
        build_root_mounted = 1;
    }
    reply_ok(stream, NULL);
}

/* ---------- idle control (ember-idle) ---------- */

static void mount_or_die(const char *src, const char *dst, const char *type, unsigned long flags, const char *data);

/* Two flags and nothing else: whether the guest holds itself awake, and whether it asked to be suspended
 * (that request is consumed by this answer). */
static void do_idle_query(uint32_t stream) {
    struct tlvbuf b = {.len = 0};
    struct stat st;
    tlv_u64(&b, T_HOLD, fstatat(AT_FDCWD, IDLE_DIR "/hold", &st, AT_SYMLINK_NOFOLLOW) == 0);
    tlv_u64(&b, T_SUSPEND_NOW, unlink(IDLE_DIR "/suspend") == 0);
    out_frame(stream, G_IDLE_STATE, b.data, b.len, NULL, 0);
}

/* The guest command, run by any guest user: create or remove a flag file in IDLE_DIR. */
static int idle_main(int argc, char **argv) {
    const char *cmd = argc == 2 ? argv[1] : "";
    static const char *const cmds[] = {"hold", "release", "suspend", "status"};
    int known = 0, dir = -1, fd;
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) known |= !strcmp(cmd, cmds[i]);
    if (known && (dir = open(IDLE_DIR, O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) < 0) {
        fprintf(stderr, "ember-idle: %s: %s (not an Ember VM?)\n", IDLE_DIR, strerror(errno));
        return 1;
    }
    if (!strcmp(cmd, "hold") || !strcmp(cmd, "suspend")) {
        fd = openat(dir, cmd, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0666);
        if (fd < 0) { fprintf(stderr, "ember-idle %s: %s\n", cmd, strerror(errno)); return 1; }
        close(fd);
        return 0;
    }
    if (!strcmp(cmd, "release")) {
        if (unlinkat(dir, "hold", 0) < 0 && errno != ENOENT) { fprintf(stderr, "ember-idle release: %s\n", strerror(errno)); return 1; }
        return 0;
    }
    if (!strcmp(cmd, "status")) {
        struct stat st;
        puts(fstatat(dir, "hold", &st, AT_SYMLINK_NOFOLLOW) == 0 ? "held" : "not held");
        return 0;
    }
    fputs("usage: ember-idle hold|release|suspend|status\n"
          "  hold     keep this VM awake (no idle suspend) until 'ember-idle release'; its maximum duration still ends it\n"
          "  release  let it be suspended when idle again\n"
          "  suspend  ask Ember to suspend it now (VMs run with --idle-timeout; within one scheduler pass)\n"
          "  status   print whether it is held\n", stderr);
    return 2;
}

/* At boot: a tmpfs for the flags (small: any guest user writes it) and a read-only one holding this binary. */
static void idle_setup(void) {
    mount_or_die("tmpfs", IDLE_DIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0777,size=16k,nr_inodes=64");
    mount_or_die("tmpfs", IDLE_BIN_DIR, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4m");
    int in = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    int out = open(IDLE_BIN, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0755);
    if (in < 0 || out < 0) die(IDLE_BIN);
    char buf[CHUNK];
    ssize_t r;
    while ((r = read(in, buf, sizeof buf)) > 0)
        if (write(out, buf, (size_t)r) != r) die(IDLE_BIN);
    if (r < 0) die(IDLE_BIN);
    close(in); close(out);
    if (mount(NULL, IDLE_BIN_DIR, NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0) die(IDLE_BIN_DIR);
}

/* ---------- tcp relays (the host's ingress) ----------
 * CONNECT opens a TCP connection to 127.0.0.1:port inside the guest. Bytes flow both ways as frames,
 * each direction on credit: the host grants what it may receive (T_SIZE of CONNECT, then TCP_CREDIT)
 * and the socket is read only within it; the host may send TCP_WINDOW bytes beyond what this agent
 * credited back (G_CREDIT, as for exec stdin, T_CLOSED once the socket refuses more). TCP_SHUT is the
 * host's half-close (shutdown(SHUT_WR) once pending bytes are written); G_TCP_EOF is the app's. */

static void tcp_connected(struct sess *s) {
    struct tlvbuf b = {.len = 0};
    s->connecting = 0;
    tlv_u64(&b, T_SIZE, TCP_WINDOW);
    out_frame(s->stream, G_TCP_CONNECTED, b.data, b.len, NULL, 0);
}

static void do_tcp_connect(uint32_t stream, const unsigned char *p, size_t n) {
    uint64_t port_no = tlv_u(p, n, T_PORT, 0), credit = tlv_u(p, n, T_SIZE, 0);
    struct sess *s;
    if (port_no == 0 || port_no > 65535) { reply_err(stream, EINVAL, "connect needs a port 1-65535"); return; }
    if (credit > TCP_CREDIT_MAX) credit = TCP_CREDIT_MAX;
    if (!(s = sess_new(stream, S_TCP))) { reply_err(stream, EBUSY, "too many concurrent sessions or stream reused"); return; }
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s->fd < 0) { reply_err(stream, errno, "socket: %s", strerror(errno)); sess_free(s); return; }
    s->port = (uint16_t)port_no;
    s->tx_credit = credit;
    int one = 1; /* a request's head and body are separate sends: Nagle would hold the second for an ACK */
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port_no)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s->fd, (struct sockaddr *)&addr, sizeof addr) == 0) tcp_connected(s);
    else if (errno == EINPROGRESS) s->connecting = 1;
    else { reply_err(stream, errno, "port %u: %s", (unsigned)port_no, strerror(errno)); sess_free(s); }
}

static void tcp_connect_done(struct sess *s) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err == EINPROGRESS) return;
    if (err) { reply_err(s->stream, err, "port %u: %s", (unsigned)s->port, strerror(err)); sess_free(s); return; }
    tcp_connected(s);
}

/* The relay is over once the app's side ended and the host's is shut (or refused): free it. */
static void tcp_maybe_done(struct sess *s) {
    if (s->kind == S_TCP && s->rd_eof && !s->pending_len && (s->wr_shut || (s->stdin_closed && s->closed_told)) &&
        !s->credit_owed)
        sess_free(s);
}

static void flush_tcp(struct sess *s) {
    while (s->pending_len && !s->stdin_closed) {
        ssize_t w = send(s->fd, s->pending, s->pending_len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) break;
            if (errno == EINTR) continue;
            s->credit_owed += s->pending_len; /* the app stopped reading (reset, or it shut its side) */
            s->pending_len = 0;
            s->stdin_closed = 1;
            break;
        }
        memmove(s->pending, s->pending + w, s->pending_len - (size_t)w);
        s->pending_len -= (size_t)w;
        s->credit_owed += (uint64_t)w;
    }
    if (!s->pending_len && s->stdin_eof && !s->wr_shut && !s->stdin_closed) {
        shutdown(s->fd, SHUT_WR);
        s->wr_shut = 1;
    }
    send_credit(s);
}

static void do_tcp_send(struct sess *s, const unsigned char *p, size_t n) {
    if (s->stdin_closed || s->wr_shut || s->stdin_eof) { s->credit_owed += n; send_credit(s); return; }
    if (s->pending_len + n > TCP_WINDOW) {
        logmsg("tcp bytes beyond the granted credit on stream %u", s->stream);
        reply_err(s->stream, EOVERFLOW, "data arrived beyond the agent's credit; the connection was closed");
        sess_free(s);
        return;
    }
    char *np = realloc(s->pending, s->pending_len + n);
    if (!np) { reply_err(s->stream, ENOMEM, "out of memory for a relay"); sess_free(s); return; }
    s->pending = np;
    memcpy(s->pending + s->pending_len, p, n);
    s->pending_len += n;
    flush_tcp(s);
}

/* Read the socket within the host's credit while the output buffer has room. */
static void pump_tcp(struct sess *s) {
    char buf[CHUNK];
    while (!s->connecting && !s->rd_eof && s->tx_credit && producers_may_run()) {
        size_t want = s->tx_credit < sizeof buf ? (size_t)s->tx_credit : sizeof buf;
        ssize_t r = recv(s->fd, buf, want, 0);
        if (r > 0) { out_frame(s->stream, G_TCP_RECV, buf, (size_t)r, NULL, 0); s->tx_credit -= (uint64_t)r; continue; }
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (r < 0) { reply_err(s->stream, errno, "port %u: %s", (unsigned)s->port, strerror(errno)); sess_free(s); return; }
        out_frame(s->stream, G_TCP_EOF, NULL, 0, NULL, 0);
        s->rd_eof = 1;
    }
}

/* ---------- dispatch ---------- */

/* ---------- readiness probe ---------- */

/* Connect to 127.0.0.1:port (an EXPOSEd port accepts: the app is ready). Bounded by short
 * socket timeouts (only used while an image is being captured); HTTP hooks are do_hook's. */
static void do_probe(uint32_t stream, const unsigned char *p, size_t n) {
    uint64_t port_no = tlv_u(p, n, T_PORT, 0);
    if (port_no == 0 || port_no > 65535) { reply_err(stream, EINVAL, "probe needs a port 1-65535"); return; }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) { reply_err(stream, errno, "socket: %s", strerror(errno)); return; }
    struct timeval tv = {.tv_sec = 2};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port_no)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        reply_err(stream, errno, "port %u: %s", (unsigned)port_no, strerror(errno));
        close(fd);
        return;
    }
    close(fd);
    reply_ok(stream, NULL);
}

/* ---------- app hooks ---------- */

/* POST /ember/v1/<name> (or the T_PATH it is given: images of the AWS API use
 * /aws/lambda-microvms/runtime/v1/<name>) with a body to 127.0.0.1:<port>, without ever blocking the loop: a
 * non-blocking socket driven by serve() (pump_hook) until the answer ends (EOF, its
 * Content-Length, or HOOK_ANSWER_MAX bytes kept) or the deadline passes. The host gets the
 * answer's first HOOK_ANSWER_MAX bytes raw (it parses and bounds them) or an error
 * (ETIMEDOUT past the deadline, the connect error, EPROTO for no answer at all). */
static int hook_room(void) { return connected && out_free() >= HOOK_ANSWER_MAX + 1024 + OUT_RESERVE / 2; }

static void do_hook(uint32_t stream, const unsigned char *p, size_t n) {
    uint64_t port_no = tlv_u(p, n, T_PORT, 0), timeout = tlv_u(p, n, T_TIMEOUT_MS, 0);
    const unsigned char *name = NULL, *body = NULL, *path = NULL;
    long name_len = tlv_get(p, n, T_HOOK_NAME, 0, &name), body_len = tlv_get(p, n, T_HOOK_BODY, 0, &body);
    long path_len = tlv_get(p, n, T_PATH, 0, &path);
    struct sess *s;
    if (port_no == 0 || port_no > 65535) { reply_err(stream, EINVAL, "a hook needs a port 1-65535"); return; }
    if (timeout == 0 || timeout > HOOK_TIMEOUT_MAX_MS) { reply_err(stream, EINVAL, "a hook needs a timeout of 1 ms to 1 hour"); return; }
    if (name_len < 1 || name_len > HOOK_NAME_MAX) { reply_err(stream, EINVAL, "a hook needs a name of 1-%d letters", HOOK_NAME_MAX); return; }
    for (long i = 0; i < name_len; i++)
        if (name[i] < 'a' || name[i] > 'z') { reply_err(stream, EINVAL, "a hook name is lowercase letters"); return; }
    if (path_len >= 0) { /* a path of its own: '/' then letters, digits, '/', '-', '_', '.' */
        if (path_len < 2 || path_len > HOOK_PATH_MAX || path[0] != '/') {
            reply_err(stream, EINVAL, "a hook path is '/' and at most %d characters", HOOK_PATH_MAX); return;
        }
        for (long i = 0; i < path_len; i++) {
            unsigned char c = path[i];
            if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || (c && strchr("/-_.", c)))) {
                reply_err(stream, EINVAL, "a hook path holds letters, digits, '/', '-', '_' or '.'"); return;
            }
        }
    }
    if (body_len < 0) body_len = 0;
    if (body_len > HOOK_BODY_MAX) { reply_err(stream, E2BIG, "a hook body is at most %d bytes", HOOK_BODY_MAX); return; }
    if (!(s = sess_new(stream, S_HOOK))) { reply_err(stream, EBUSY, "too many concurrent sessions or stream reused"); return; }
    char head[512]; /* the longest head (HOOK_PATH_MAX, a 20-digit length) is well under it */
    int hl = snprintf(head, sizeof head,
                      "POST %s%.*s HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\n"
                      "Content-Length: %ld\r\nConnection: close\r\n\r\n", path_len >= 0 ? "" : "/ember/v1/",
                      (int)(path_len >= 0 ? path_len : name_len), (const char *)(path_len >= 0 ? path : name), body_len);
    s->req = malloc((size_t)hl + (size_t)body_len);
    s->ans = malloc(HOOK_ANSWER_MAX + 1);
    if (!s->req || !s->ans) { reply_err(stream, ENOMEM, "out of memory for a hook"); sess_free(s); return; }
    memcpy(s->req, head, (size_t)hl);
    if (body_len) memcpy(s->req + hl, body, (size_t)body_len);
    s->req_len = (size_t)hl + (size_t)body_len;
    s->hook_port = (unsigned)port_no;
    s->deadline_ms = now_ms() + (int64_t)timeout;
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) { reply_err(stream, errno, "socket: %s", strerror(errno)); sess_free(s); return; }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port_no)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s->fd, (struct sockaddr *)&addr, sizeof addr) == 0) s->phase = 1;
    else if (errno == EINPROGRESS) s->phase = 0;
    else { reply_err(stream, errno, "port %u: %s", s->hook_port, strerror(errno)); sess_free(s); }
}

/* The answer is complete: the headers ended and the body holds Content-Length bytes. */
static int hook_answer_complete(struct sess *s) {
    s->ans[s->ans_len] = 0;
    char *end = strstr(s->ans, "\r\n\r\n");
    if (!end) return 0;
    char *cl = strcasestr(s->ans, "\ncontent-length:");
    if (!cl || cl > end) return 0;
    unsigned long long want = strtoull(cl + 16, NULL, 10);
    return (unsigned long long)(s->ans_len - (size_t)(end + 4 - s->ans)) >= want;
}

static void hook_finish(struct sess *s) {
    if (!s->ans_len) reply_err(s->stream, EPROTO, "port %u closed the connection without an answer", s->hook_port);
    else {
        struct tlvbuf b = {.len = 0};
        tlv_put(&b, T_HOOK_ANSWER, s->ans, (uint32_t)s->ans_len);
        reply_ok(s->stream, &b);
    }
    sess_free(s);
}

static void pump_hook(struct sess *s) {
    if (s->phase == 0) {
        int err = 0; socklen_t len = sizeof err;
        if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        if (err == EINPROGRESS || err == EALREADY) return;
        if (err) { reply_err(s->stream, err, "port %u: %s", s->hook_port, strerror(err)); sess_free(s); return; }
        s->phase = 1;
    }
    while (s->phase == 1) {
        ssize_t w = write(s->fd, s->req + s->req_off, s->req_len - s->req_off);
        if (w < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (w < 0) { s->phase = 2; break; } /* it may have answered before reading it all (e.g. 413) */
        s->req_off += (size_t)w;
        if (s->req_off == s->req_len) s->phase = 2;
    }
    while (s->ans_len < HOOK_ANSWER_MAX) {
        ssize_t r = read(s->fd, s->ans + s->ans_len, HOOK_ANSWER_MAX - s->ans_len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) { if (hook_answer_complete(s)) hook_finish(s); return; }
        if (r <= 0) { hook_finish(s); return; } /* EOF, or a reset after it answered */
        s->ans_len += (size_t)r;
    }
    hook_finish(s); /* the rest of a long answer is not read */
}

/* A hook past its deadline answers ETIMEDOUT; returns the ms until it is due (or -1 once answered). */
static int hook_deadline(struct sess *s, int64_t now) {
    if (now < s->deadline_ms) return (int)(s->deadline_ms - now);
    reply_err(s->stream, ETIMEDOUT, "port %u did not answer the hook in time", s->hook_port);
    sess_free(s);
    return -1;
}

static int ct_equal(const unsigned char *a, size_t al, const unsigned char *b, size_t bl) {
    unsigned char d = (unsigned char)(al != bl);
    for (size_t i = 0; i < al && i < bl; i++) d |= a[i] ^ b[i];
    return d == 0;
}

/* The first well-formed SET_TOKEN since boot sets the token; every later one is refused. */
static void set_token_once(const unsigned char *p, size_t n) {
    const unsigned char *v = NULL;
    long l = tlv_get(p, n, T_TOKEN, 0, &v);
    if (token_len) { logmsg("refused a SET_TOKEN: this agent has its token (it changes only with RESTORE)"); return; }
    if (l < TOKEN_MIN || (size_t)l > sizeof token) { logmsg("refused a SET_TOKEN of a bad size"); return; }
    memcpy(token, v, (size_t)l);
    token_len = (size_t)l;
}

/* Forget every session of the host's previous connection: its commands keep running (their
 * output is drained, they are reaped), its streams end. A host that connects afresh (a new
 * daemon, or any restore: the agent was saved connected and never saw that host go) numbers its
 * streams from 1 again, and must not meet the old ones (e.g. the app an image captured running). */
static void drop_sessions(void) {
    applog_stream = 0; /* the build's exec stream (if any) is gone; the app's log goes on */
    for (int i = 0; i < MAX_SESS; i++) {
        if (sessions[i].kind == S_EXEC) { /* keep reaping; output goes nowhere */
            if (sessions[i].pty) close(sessions[i].out_fd); /* a hangup: the terminal's processes get SIGHUP */
            else orphan_fd(sessions[i].out_fd);
            orphan_fd(sessions[i].err_fd);
            sessions[i].out_fd = sessions[i].err_fd = -1;
            if (sessions[i].in_fd >= 0) { close(sessions[i].in_fd); sessions[i].in_fd = -1; }
            sessions[i].kind = S_FREE;
        } else if (sessions[i].kind != S_FREE) sess_free(&sessions[i]);
    }
}

static void handle(uint32_t stream, uint8_t type, const unsigned char *p, size_t n) {
    struct sess *s;
    if (type == M_SET_TOKEN) { set_token_once(p, n); return; }
    if (type == M_HELLO) {
        const unsigned char *tok = NULL, *nonce = NULL;
        long tl = tlv_get(p, n, T_TOKEN, 0, &tok), nl = tlv_get(p, n, T_NONCE, 0, &nonce);
        if (tl < 0 || nl != 16 || !token_len || !ct_equal(tok, (size_t)tl, (const unsigned char *)token, token_len)) {
            authed = 0;
            logmsg(token_len ? "rejected a session with a bad token" : "rejected a session: no token set yet");
            if (nl == 16) out_frame(0, G_HELLO_NAK, "EMBERNAK", 8, nonce, 16);
            return;
        }
        authed = 1;
        drop_sessions();
        out_frame(0, G_HELLO_ACK, "EMBERACK", 8, nonce, 16);
        return;
    }
    if (!authed) return;
    switch (type) {
    case M_EXEC: do_exec(stream, p, n); break;
    case M_STDIN: if ((s = sess_find(stream)) && s->kind == S_EXEC) do_stdin(s, p, n); break;
    case M_STDIN_EOF:
        if ((s = sess_find(stream)) && s->kind == S_EXEC) { s->stdin_eof = 1; flush_stdin(s); }
        break;
    case M_SIGNAL:
        if ((s = sess_find(stream)) && s->kind == S_EXEC && !s->exited) {
            int sig = (int)tlv_u(p, n, T_SIGNAL, SIGKILL);
            if (sig > 0 && sig < 65) kill(-s->pid, sig);
        } else if (s && (s->kind == S_READ || s->kind == S_LIST || s->kind == S_HOOK || s->kind == S_LOGWAIT || s->kind == S_TCP)) sess_free(s); /* the host gave up on it */
        break;
    case M_WRITE: do_write(stream, p, n); break;
    case M_WDATA: if ((s = sess_find(stream)) && s->kind == S_WRITE) do_wdata(s, p, n); break;
    case M_WEOF: if ((s = sess_find(stream)) && s->kind == S_WRITE) do_weof(s); break;
    case M_READ: do_read(stream, p, n); break;
    case M_LIST: do_list(stream, p, n); break;
    case M_RESTORE: do_restore(stream, p, n); break;
    case M_SYNC: sync(); reply_ok(stream, NULL); break;
    case M_PING: reply_ok(stream, NULL); break;
    case M_PROBE: do_probe(stream, p, n); break;
    case M_IDLE_QUERY: do_idle_query(stream); break;
    case M_TCP_CONNECT: do_tcp_connect(stream, p, n); break;
    case M_TCP_SEND: if ((s = sess_find(stream)) && s->kind == S_TCP && !s->connecting) do_tcp_send(s, p, n); break;
    case M_TCP_SHUT:
        if ((s = sess_find(stream)) && s->kind == S_TCP && !s->connecting) { s->stdin_eof = 1; flush_tcp(s); }
        break;
    case M_TCP_CREDIT:
        if ((s = sess_find(stream)) && s->kind == S_TCP) {
            uint64_t more = tlv_u(p, n, T_SIZE, 0);
            s->tx_credit = s->tx_credit + more > TCP_CREDIT_MAX ? TCP_CREDIT_MAX : s->tx_credit + more;
        }
        break;
    case M_HOOK: do_hook(stream, p, n); break;
    case M_LOGS: do_logs(stream, p, n); break;
    case M_RESIZE: if ((s = sess_find(stream)) && s->kind == S_EXEC) do_resize(s, p, n); break;
    case M_PS: do_ps(stream); break;
    case M_KILL: do_kill(stream, p, n); break;
    default: reply_err(stream, ENOSYS, "unknown request type %u", type);
    }
}

static void disconnect(void) {
    connected = 0; authed = 0; in_len = 0; out_head = out_len = 0;
    drop_sessions();
}

/* Handle every complete frame in inbuf; keeps a partial tail. */
static void parse_frames(void) {
    size_t pos = 0;
    while (in_len - pos >= HDR) {
        uint32_t len, stream;
        memcpy(&len, inbuf + pos, 4);
        memcpy(&stream, inbuf + pos + 4, 4);
        if (len > MAX_PAYLOAD) { logmsg("oversized frame from host"); disconnect(); return; }
        if (in_len - pos < HDR + len) break;
        handle(stream, inbuf[pos + 8], inbuf + pos + HDR, len);
        if (!connected) return;
        pos += HDR + len;
    }
    memmove(inbuf, inbuf + pos, in_len - pos);
    in_len -= pos;
}

static void read_port(void) {
    for (;;) {
        ssize_t r = read(port, inbuf + in_len, sizeof inbuf - in_len);
        if (r == 0) { disconnect(); return; }
        if (r < 0) { if (errno != EAGAIN && errno != EINTR) disconnect(); return; }
        in_len += (size_t)r;
        parse_frames();
        if (!connected) return;
    }
}

static void write_port(void) {
    while (out_len) {
        ssize_t w = write(port, outbuf + out_head, out_len);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            disconnect();
            return;
        }
        out_head += (size_t)w; out_len -= (size_t)w;
    }
    out_head = 0;
}

/* The port reads 0 while no host is attached and -EAGAIN once one is. */
static void probe_connection(void) {
    ssize_t r = read(port, inbuf, sizeof inbuf);
    if (r == 0) return;
    connected = 1;
    authed = 0;
    in_len = r > 0 ? (size_t)r : 0;
    parse_frames();
}

static void drain_orphans(void) {
    char buf[CHUNK];
    for (int i = 0; i < n_orphans;) {
        ssize_t r = read(orphans[i], buf, sizeof buf);
        if (r > 0 || (r < 0 && (errno == EAGAIN || errno == EINTR))) { i++; continue; }
        close(orphans[i]);
        orphans[i] = orphans[--n_orphans];
    }
}

static void serve(void) {
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    signal(SIGPIPE, SIG_IGN);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) die("signalfd");
    outbuf = malloc(OUT_CAP);
    if (!outbuf) die("malloc");

    struct pollfd fds[4 + 2 + MAX_SESS * 3 + MAX_ORPHANS]; /* 2: the app log's pipes */
    struct { struct sess *s; int which; } map[sizeof fds / sizeof fds[0]];
    for (;;) {
        if (!connected) probe_connection();
        int nf = 0, timeout = -1;
        fds[nf].fd = sfd; fds[nf].events = POLLIN; map[nf].s = NULL; map[nf].which = 0; nf++;
        if (connected) {
            fds[nf].fd = port; fds[nf].events = (short)(POLLIN | (out_len ? POLLOUT : 0));
            map[nf].s = NULL; map[nf].which = 1; nf++;
        } else timeout = 20;
        int64_t now = now_ms();
        for (int i = 0; i < MAX_SESS; i++) {
            struct sess *s = &sessions[i];
            if (s->kind == S_EXEC) {
                if (s->deadline_ms && !s->exited && !s->timed_out) {
                    if (now >= s->deadline_ms) { s->timed_out = 1; kill(-s->pid, SIGKILL); }
                    else {
                        int left = (int)(s->deadline_ms - now);
                        if (timeout < 0 || left < timeout) timeout = left;
                    }
                }
                if (s->exited) { if (timeout < 0 || timeout > 5) timeout = 5; continue; }
                if (producers_may_run()) {
                    if (s->out_fd >= 0) { fds[nf].fd = s->out_fd; fds[nf].events = POLLIN; map[nf].s = s; map[nf].which = 2; nf++; }
                    if (s->err_fd >= 0) { fds[nf].fd = s->err_fd; fds[nf].events = POLLIN; map[nf].s = s; map[nf].which = 3; nf++; }
                }
                if (s->in_fd >= 0 && s->pending_len) { fds[nf].fd = s->in_fd; fds[nf].events = POLLOUT; map[nf].s = s; map[nf].which = 4; nf++; }
            } else if ((s->kind == S_READ || s->kind == S_LIST) && producers_may_run()) timeout = 0;
            else if (s->kind == S_HOOK && hook_room()) {
                int left = hook_deadline(s, now);
                if (left < 0) continue;
                if (timeout < 0 || left < timeout) timeout = left;
                fds[nf].fd = s->fd; fds[nf].events = s->phase == 2 ? POLLIN : POLLOUT;
                map[nf].s = s; map[nf].which = 6; nf++;
            } else if (s->kind == S_HOOK && (timeout < 0 || timeout > 5)) timeout = 5; /* no room for its answer yet */
            else if (s->kind == S_LOGWAIT) {
                if (log_due(s, now)) { if (producers_may_run()) timeout = 0; }
                else if (timeout < 0 || s->deadline_ms - now < timeout) timeout = (int)(s->deadline_ms - now);
            }
            else if (s->kind == S_TCP) {
                short ev = 0;
                if (s->connecting) ev = producers_may_run() ? POLLOUT : 0;
                else {
                    if (!s->rd_eof && s->tx_credit && producers_may_run()) ev |= POLLIN;
                    if (s->pending_len && !s->stdin_closed) ev |= POLLOUT;
                }
                if (ev) { fds[nf].fd = s->fd; fds[nf].events = ev; map[nf].s = s; map[nf].which = 8; nf++; }
            }
        }
        if (!applog_stream || !authed || producers_may_run())
            for (int i = 0; i < 2; i++)
                if (applog_fd[i] >= 0) { fds[nf].fd = applog_fd[i]; fds[nf].events = POLLIN; map[nf].s = NULL; map[nf].which = 7; nf++; }
        for (int i = 0; i < n_orphans; i++) { fds[nf].fd = orphans[i]; fds[nf].events = POLLIN; map[nf].s = NULL; map[nf].which = 5; nf++; }

        int r = poll(fds, (nfds_t)nf, timeout);
        if (r < 0 && errno != EINTR) die("poll");
        int orphan_ready = 0, applog_ready = 0;
        for (int i = 0; r > 0 && i < nf; i++) {
            if (!fds[i].revents) continue;
            struct sess *s = map[i].s;
            switch (map[i].which) {
            case 0: { struct signalfd_siginfo si; while (read(sfd, &si, sizeof si) > 0) {} reap(); break; }
            case 1:
                if (fds[i].revents & POLLIN) read_port();
                else if (fds[i].revents & (POLLHUP | POLLERR)) { disconnect(); break; }
                if (connected && (fds[i].revents & POLLOUT)) write_port();
                break;
            case 2: if (s->kind == S_EXEC) pump_pipe(s, &s->out_fd, G_STDOUT); break;
            case 3: if (s->kind == S_EXEC) pump_pipe(s, &s->err_fd, G_STDERR); break;
            case 4: if (s->kind == S_EXEC) flush_stdin(s); break;
            case 5: orphan_ready = 1; break;
            case 6: if (s->kind == S_HOOK && s->fd == fds[i].fd) pump_hook(s); break;
            case 7: applog_ready = 1; break;
            case 8:
                if (s->kind == S_TCP && s->connecting) { tcp_connect_done(s); break; }
                if (s->kind == S_TCP && s->pending_len) flush_tcp(s);
                if (s->kind == S_TCP) pump_tcp(s);
                break;
            }
        }
        if (orphan_ready) drain_orphans();
        if (applog_ready) pump_applog();
        reap();
        now = now_ms();
        for (int i = 0; i < MAX_SESS; i++) {
            if (sessions[i].kind == S_EXEC) { send_credit(&sessions[i]); finish_exec_if_done(&sessions[i]); }
            else if (sessions[i].kind == S_READ) pump_read(&sessions[i]);
            else if (sessions[i].kind == S_LIST) pump_list(&sessions[i]);
            else if (sessions[i].kind == S_LOGWAIT) answer_log(&sessions[i], now);
            else if (sessions[i].kind == S_TCP) { send_credit(&sessions[i]); tcp_maybe_done(&sessions[i]); }
        }
        if (connected && out_len) write_port();
    }
}

/* ---------- boot ---------- */

static void mount_or_die(const char *src, const char *dst, const char *type, unsigned long flags, const char *data) {
    mkdir(dst, 0755);
    if (mount(src, dst, type, flags, data) < 0 && errno != EBUSY) die(dst);
}

static char cmdline[4096];

static const char *cmdline_arg(const char *key) {
    static char val[256];
    size_t kl = strlen(key);
    for (char *p = cmdline; (p = strstr(p, key)); p += kl) {
        if ((p == cmdline || p[-1] == ' ') && p[kl] == '=') {
            size_t i = 0;
            p += kl + 1;
            while (p[i] && p[i] != ' ' && p[i] != '\n' && i < sizeof val - 1) { val[i] = p[i]; i++; }
            val[i] = 0;
            return val;
        }
    }
    return NULL;
}

static void load_modules(void) {
    FILE *f = fopen("/ember/modules", "re");
    char line[512];
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        if (!*line) continue;
        int fd = open(line, O_RDONLY | O_CLOEXEC);
        if (fd < 0) die(line);
        if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST) die(line);
        close(fd);
        unlink(line);
    }
    fclose(f);
}

static void wait_for(const char *path) {
    for (int i = 0; i < 5000; i++) {
        if (access(path, F_OK) == 0) return;
        usleep(1000);
    }
    errno = ENODEV;
    die(path);
}

static void stage1(void) {
    mount_or_die("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    mount_or_die("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) { ssize_t r = read(fd, cmdline, sizeof cmdline - 1); if (r > 0) cmdline[r] = 0; close(fd); }
    load_modules();
    const char *root = cmdline_arg("ember.root");
    if (!root) root = "/dev/vda";
    wait_for(root);
    snprintf(root_dev, sizeof root_dev, "%s", root); /* root may point at cmdline_arg's buffer */
    if (cmdline_arg("ember.build")) { /* mounted at the first RESTORE (mount_build_root) */
        build_mode = 1;
        if (umount2("/proc", MNT_DETACH) < 0) die("umount /proc");
        return;
    }
    mount_or_die(root, "/newroot", "ext4", 0, NULL);
    if (umount2("/proc", MNT_DETACH) < 0) die("umount /proc");
    mkdir("/newroot/dev", 0755);
    if (mount("/dev", "/newroot/dev", NULL, MS_MOVE, NULL) < 0) die("move /dev");
    unlink("/ember/modules"); unlink("/init");
    if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 || chdir("/") < 0)
        die("switch root");
}

/* Hardened link and file-creation rules in sticky world-writable directories
 * (Linux's own defaults are 0): guest users cannot aim root at other files. */
static void harden_sysctls(void) {
    static const struct { const char *path, *value; } knobs[] = {
        {"/proc/sys/fs/protected_symlinks", "1"}, {"/proc/sys/fs/protected_hardlinks", "1"},
        {"/proc/sys/fs/protected_fifos", "2"}, {"/proc/sys/fs/protected_regular", "2"},
    };
    for (size_t i = 0; i < sizeof knobs / sizeof knobs[0]; i++) {
        int fd = open(knobs[i].path, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, knobs[i].value, 1) != 1) die(knobs[i].path);
        close(fd);
    }
}

/* The VM's NIC, if its machine has one (ember.network.policy): the same address, gateway and
 * resolver in every VM (a VM with egress has a network namespace of its own; one with egress none
 * has a NIC without a backend), set once at the template's boot and so kept in every snapshot. */
#define NIC_GUEST_IP "169.254.0.21"
#define NIC_GATEWAY_IP "169.254.0.22"
#define NIC_NETMASK "255.255.255.252"
#define NIC_RESOLV GENERATION_DIR "/resolv.conf"

static void set_inet(struct sockaddr *sa, const char *address) {
    struct sockaddr_in *sin = (struct sockaddr_in *)sa;
    memset(sin, 0, sizeof *sin);
    sin->sin_family = AF_INET;
    inet_pton(AF_INET, address, &sin->sin_addr);
}

static void configure_nic(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "eth0");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) { close(s); return; } /* no NIC: an image from before */
    short flags = ifr.ifr_flags;
    /* IPv4 only (the namespace lets nothing else in): no IPv6 autoconfiguration, whose timers
     * (DAD, router solicitations) would run on in every clone */
    int v6 = open("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", O_WRONLY | O_CLOEXEC);
    if (v6 >= 0) {
        if (write(v6, "1", 1) != 1) logmsg("eth0: disable_ipv6: %s", strerror(errno));
        close(v6);
    }
    set_inet(&ifr.ifr_addr, NIC_GUEST_IP);
    int ok = ioctl(s, SIOCSIFADDR, &ifr) == 0;
    set_inet(&ifr.ifr_netmask, NIC_NETMASK);
    ok = ok && ioctl(s, SIOCSIFNETMASK, &ifr) == 0;
    ifr.ifr_flags = flags | IFF_UP;
    ok = ok && ioctl(s, SIOCSIFFLAGS, &ifr) == 0;
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    set_inet(&rt.rt_dst, "0.0.0.0");
    set_inet(&rt.rt_genmask, "0.0.0.0");
    set_inet(&rt.rt_gateway, NIC_GATEWAY_IP);
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = ifr.ifr_name;
    ok = ok && ioctl(s, SIOCADDRT, &rt) == 0;
    close(s);
    if (!ok) { logmsg("eth0: %s", strerror(errno)); return; }
    /* the resolver is the gateway (its namespace forwards DNS to the host's); the image's own file
     * stays underneath, as in build VMs */
    int fd = open(NIC_RESOLV, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    static const char line[] = "nameserver " NIC_GATEWAY_IP "\n";
    if (fd < 0 || write(fd, line, sizeof line - 1) != (ssize_t)(sizeof line - 1)) {
        if (fd >= 0) close(fd);
        logmsg("%s: %s", NIC_RESOLV, strerror(errno));
        return;
    }
    close(fd);
    struct stat st;
    if (lstat("/etc", &st) < 0 || !S_ISDIR(st.st_mode)) return;
    fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) { logmsg("/etc/resolv.conf: %s", strerror(errno)); return; }
    close(fd);
    if (mount(NIC_RESOLV, "/etc/resolv.conf", NULL, MS_BIND, NULL) < 0) logmsg("resolv.conf: %s", strerror(errno));
}

static void stage2(void) {
    mount_or_die("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_or_die("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    mount_or_die("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666");
    mount_or_die("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    harden_sysctls();
    if (!build_mode) {
        mkdir("/run", 0755);
        mount_or_die("tmpfs", GENERATION_DIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k");
        if (write_generation() < 0) die(GENERATION_FILE);
        idle_setup();
    }
    sethostname("ember", 5);
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s >= 0) {
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        strcpy(ifr.ifr_name, "lo");
        if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) { ifr.ifr_flags |= IFF_UP; ioctl(s, SIOCSIFFLAGS, &ifr); }
        close(s);
    }
    if (!build_mode) configure_nic();
    /* Find our virtio-serial port by name. */
    char dev[300] = "";
    for (int tries = 0; tries < 5000 && !dev[0]; tries++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            char path[300], name[64] = "";
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            ssize_t r = read(fd, name, sizeof name - 1);
            close(fd);
            if (r > 0 && strncmp(name, PORT_NAME, strlen(PORT_NAME)) == 0) snprintf(dev, sizeof dev, "/dev/%s", e->d_name);
        }
        if (d) closedir(d);
        if (!dev[0]) usleep(1000);
    }
    if (!dev[0]) { errno = ENODEV; die("agent port " PORT_NAME); }
    wait_for(dev);
    port = open(dev, O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (port < 0) die(dev);
    logmsg("ready on %s", dev);
}

int main(int argc, char **argv) {
    const char *name = argc > 0 ? strrchr(argv[0], '/') : NULL;
    if (argc > 0 && !strcmp(name ? name + 1 : argv[0], "ember-idle")) return idle_main(argc, argv);
    if (getpid() != 1) { fprintf(stderr, "ember-agent must run as PID 1 of an Ember VM\n"); return 2; }
    if (access("/ember/modules", F_OK) == 0) stage1();
    stage2();
    serve();
    return 0;
}
