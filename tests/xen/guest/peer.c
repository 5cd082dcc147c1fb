/*
 * gb-peer: the project's own peer program inside a PV guest of the real-Xen
 * suite.  Static, tiny, no Python: a guest under TCG has no time for an
 * interpreter.  It does what a guest of the broker's users does (share
 * pages with dom0, map dom0's, event channels, unmap notifications) on the
 * guest's real /dev/xen devices, driven by commands from dom0.
 *
 * Bootstrap: it grants one control page to domain 0 (gntalloc) and
 * publishes "<domid> <control ref>" in xenstore at data/gb-peer (its own
 * domain's home, which the guest may write).  dom0 (tests/xen/
 * test_guest_e2e.py, through the broker) maps the control page.
 *
 * The control page: u32 seq at 0 (dom0 bumps it after writing a command),
 * u32 done at 4 (the peer sets it to seq once the reply is written), the
 * command at 8 (text, NUL-terminated), the reply at 2048 ("ok ..." or
 * "err ...").  Both sides poll (the peer every 20 ms): the event channels
 * are left to the tests themselves, so that no control traffic can make an
 * event test pass.
 *
 * Commands (regions are numbered from 0 in the order they are made):
 *   share N                 gntalloc N pages to dom0 -> "ok REGION REF..."
 *   map DOMID REF...        gntdev-map grants      -> "ok REGION"
 *   peek REGION OFF LEN     -> "ok TEXT" (bytes as text, NULs as '.')
 *   byte REGION OFF         -> "ok VALUE" (decimal)
 *   poke REGION OFF TEXT    write TEXT
 *   unbound                 offer a port to dom0   -> "ok PORT"
 *   bind PORT               bind dom0's PORT       -> "ok LOCALPORT"
 *   notify PORT             notify a local port
 *   wait PORT MS            wait for an event on a local port (none within MS -> "err timeout")
 *   unmap REGION            unmap a region made by map
 *   notify-on-unmap REGION OFF PORT  arm CLEAR_BYTE|SEND_EVENT on a shared page (gntalloc)
 *   child-map DOMID REF OFF DOMPORT  a child process maps dom0's REF, binds
 *                           dom0's DOMPORT and arms CLEAR_BYTE|SEND_EVENT at OFF,
 *                           then waits to be killed -> "ok PID"
 *   kill PID                SIGKILL a child and reap it
 *   export FLAGS DOMID REF...  gntdev dma-buf export (PVH/HVM only) -> "ok FD"
 *   wait-released FD MS     IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED
 *   close FD                close a descriptor (an exported dma-buf)
 *   wait-close FD MS        a child waits (MS) for the release of exported dma-buf FD while this process closes it
 *   import FD COUNT DOMID   grant a dma-buf's pages to DOMID -> "ok REF..."
 *   import-release FD       end those grants
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
/* The Linux uapi headers use these Xen types without defining them. */
typedef uint16_t domid_t;
typedef uint32_t grant_ref_t;
#include <xen/evtchn.h>
#include <xen/gntalloc.h>
#include <xen/gntdev.h>

#define PAGE 4096
#define MAX_REGIONS 64
#define MAX_REFS 64
#define REPLY_AT 2048

/* xenstore wire protocol (xen/include/public/io/xs_wire.h) */
struct xs_msg { uint32_t type, req_id, tx_id, len; };
enum { XS_READ = 2, XS_WRITE = 11, XS_ERROR = 16 };

static void die(const char *what) {
    fprintf(stderr, "gb-peer: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* One request on /dev/xen/xenbus; the reply's payload into out (NUL-terminated). */
static int xs_request(uint32_t type, const char *payload, size_t len, char *out, size_t out_size) {
    int fd = open("/dev/xen/xenbus", O_RDWR);
    if (fd < 0) return -1;
    char buf[4096];
    struct xs_msg msg = { type, 1, 0, (uint32_t)len };
    memcpy(buf, &msg, sizeof msg);
    memcpy(buf + sizeof msg, payload, len);
    if (write(fd, buf, sizeof msg + len) != (ssize_t)(sizeof msg + len)) { close(fd); return -1; }
    ssize_t got = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (got < (ssize_t)sizeof msg) return -1;
    memcpy(&msg, buf, sizeof msg);
    size_t n = (size_t)got - sizeof msg;
    if (out) {
        if (n >= out_size) n = out_size - 1;
        memcpy(out, buf + sizeof msg, n);
        out[n] = 0;
    }
    return msg.type == XS_ERROR ? -1 : 0;
}

struct region { uint8_t *addr; size_t len; int fd; uint64_t index; };
static struct region regions[MAX_REGIONS];
static int nregions;
static int gntalloc_fd, gntdev_fd, evtchn_fd;

static int add_region(uint8_t *addr, size_t len, int fd, uint64_t index) {
    regions[nregions] = (struct region){ addr, len, fd, index };
    return nregions++;
}

/* Grant count pages to domid; returns the region, refs in refs[]. */
static int share(int fd, uint16_t domid, uint32_t count, uint32_t *refs) {
    size_t size = sizeof(struct ioctl_gntalloc_alloc_gref) + count * sizeof(uint32_t);
    struct ioctl_gntalloc_alloc_gref *op = calloc(1, size);
    op->domid = domid;
    op->flags = GNTALLOC_FLAG_WRITABLE;
    op->count = count;
    if (ioctl(fd, IOCTL_GNTALLOC_ALLOC_GREF, op) < 0) { free(op); return -1; }
    uint8_t *addr = mmap(NULL, count * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)op->index);
    if (addr == MAP_FAILED) { free(op); return -1; }
    memcpy(refs, op->gref_ids, count * sizeof(uint32_t));
    int region = add_region(addr, count * PAGE, fd, op->index);
    free(op);
    return region;
}

static int map_refs(int fd, uint32_t domid, uint32_t count, const uint32_t *refs, uint8_t **addr_out, uint64_t *index_out) {
    size_t size = sizeof(struct ioctl_gntdev_map_grant_ref) + count * sizeof(struct ioctl_gntdev_grant_ref);
    struct ioctl_gntdev_map_grant_ref *op = calloc(1, size);
    op->count = count;
    for (uint32_t i = 0; i < count; i++) {
        op->refs[i].domid = domid;
        op->refs[i].ref = refs[i];
    }
    if (ioctl(fd, IOCTL_GNTDEV_MAP_GRANT_REF, op) < 0) { free(op); return -1; }
    uint8_t *addr = mmap(NULL, count * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)op->index);
    *index_out = op->index;
    free(op);
    if (addr == MAP_FAILED) return -1;
    *addr_out = addr;
    return 0;
}

static int bind_interdomain(int fd, uint32_t domid, uint32_t port) {
    struct ioctl_evtchn_bind_interdomain op = { .remote_domain = domid, .remote_port = port };
    return ioctl(fd, IOCTL_EVTCHN_BIND_INTERDOMAIN, &op);
}

static int notify(int fd, uint32_t port) {
    struct ioctl_evtchn_notify op = { .port = port };
    return ioctl(fd, IOCTL_EVTCHN_NOTIFY, &op);
}

/* Read one pending port from an evtchn fd within ms; unmask it.  -2: timeout. */
static int wait_port(int fd, int ms) {
    struct pollfd p = { .fd = fd, .events = POLLIN };
    int ready = poll(&p, 1, ms);
    if (ready < 0) return -1;
    if (ready == 0) return -2;
    uint32_t port;
    if (read(fd, &port, sizeof port) != sizeof port) return -1;
    if (write(fd, &port, sizeof port) != sizeof port) return -1; /* unmask */
    return (int)port;
}

/* A child that maps dom0's ref, binds dom0's port and arms the unmap notify; it is killed later. */
static int child_map(uint32_t domid, uint32_t ref, uint32_t offset, uint32_t dom_port, char *reply) {
    int ready[2];
    if (pipe(ready) < 0) return -1;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        close(ready[0]);
        int gfd = open("/dev/xen/gntdev", O_RDWR | O_CLOEXEC);
        int efd = open("/dev/xen/evtchn", O_RDWR | O_CLOEXEC);
        uint8_t *addr; uint64_t index;
        int local = efd < 0 ? -1 : bind_interdomain(efd, domid, dom_port);
        char status = 'n';
        if (gfd >= 0 && local >= 0 && map_refs(gfd, domid, 1, &ref, &addr, &index) == 0) {
            struct ioctl_gntdev_unmap_notify op = {
                .index = index + offset, .action = UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT,
                .event_channel_port = (uint32_t)local };
            if (ioctl(gfd, IOCTL_GNTDEV_SET_UNMAP_NOTIFY, &op) == 0) status = 'y';
        }
        if (write(ready[1], &status, 1) != 1) _exit(1);
        for (;;) pause();
    }
    close(ready[1]);
    char status = 0;
    ssize_t got = read(ready[0], &status, 1);
    close(ready[0]);
    if (got != 1 || status != 'y') {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        errno = EIO;
        return -1;
    }
    sprintf(reply, "ok %d", (int)pid);
    return 0;
}

static int valid_region(int r, uint32_t off, uint32_t len) {
    return r >= 0 && r < nregions && regions[r].addr && off <= regions[r].len && len <= regions[r].len - off;
}

/* Run one command; the reply into reply (at most 2000 bytes). */
static void run(char *cmd, char *reply) {
    char *words[MAX_REFS + 4];
    int n = 0;
    char *rest = NULL;
    for (char *w = strtok_r(cmd, " ", &rest); w && n < MAX_REFS + 4; w = strtok_r(NULL, " ", &rest)) {
        words[n++] = w;
        if (n == 3 && strcmp(words[0], "poke") == 0) { words[n++] = rest ? rest : ""; break; }
    }
    if (n == 0) { strcpy(reply, "err empty"); return; }
    const char *op = words[0];
    errno = 0;
    if (strcmp(op, "share") == 0 && n == 2) {
        uint32_t count = (uint32_t)atoi(words[1]), refs[MAX_REFS];
        if (count == 0 || count > MAX_REFS) { strcpy(reply, "err count"); return; }
        int r = share(gntalloc_fd, 0, count, refs);
        if (r < 0) goto fail;
        int at = sprintf(reply, "ok %d", r);
        for (uint32_t i = 0; i < count; i++) at += sprintf(reply + at, " %u", refs[i]);
        return;
    }
    if (strcmp(op, "map") == 0 && n >= 3 && n - 2 <= MAX_REFS) {
        uint32_t refs[MAX_REFS], count = (uint32_t)(n - 2);
        for (uint32_t i = 0; i < count; i++) refs[i] = (uint32_t)strtoul(words[i + 2], NULL, 10);
        uint8_t *addr; uint64_t index;
        if (map_refs(gntdev_fd, (uint32_t)atoi(words[1]), count, refs, &addr, &index) < 0) goto fail;
        sprintf(reply, "ok %d", add_region(addr, count * PAGE, gntdev_fd, index));
        return;
    }
    if (strcmp(op, "peek") == 0 && n == 4) {
        int r = atoi(words[1]); uint32_t off = (uint32_t)atoi(words[2]), len = (uint32_t)atoi(words[3]);
        if (!valid_region(r, off, len) || len > 1000) { strcpy(reply, "err range"); return; }
        strcpy(reply, "ok ");
        for (uint32_t i = 0; i < len; i++) {
            uint8_t c = regions[r].addr[off + i];
            reply[3 + i] = (c >= 32 && c < 127) ? (char)c : '.';
        }
        reply[3 + len] = 0;
        return;
    }
    if (strcmp(op, "byte") == 0 && n == 3) {
        int r = atoi(words[1]); uint32_t off = (uint32_t)atoi(words[2]);
        if (!valid_region(r, off, 1)) { strcpy(reply, "err range"); return; }
        sprintf(reply, "ok %u", regions[r].addr[off]);
        return;
    }
    if (strcmp(op, "poke") == 0 && n == 4) {
        int r = atoi(words[1]); uint32_t off = (uint32_t)atoi(words[2]), len = (uint32_t)strlen(words[3]);
        if (!valid_region(r, off, len)) { strcpy(reply, "err range"); return; }
        memcpy(regions[r].addr + off, words[3], len);
        strcpy(reply, "ok");
        return;
    }
    if (strcmp(op, "unbound") == 0 && n == 1) {
        struct ioctl_evtchn_bind_unbound_port bind = { .remote_domain = 0 };
        int port = ioctl(evtchn_fd, IOCTL_EVTCHN_BIND_UNBOUND_PORT, &bind);
        if (port < 0) goto fail;
        sprintf(reply, "ok %d", port);
        return;
    }
    if (strcmp(op, "bind") == 0 && n == 2) {
        int port = bind_interdomain(evtchn_fd, 0, (uint32_t)atoi(words[1]));
        if (port < 0) goto fail;
        /* A fresh interdomain binding is pending once (Xen sets the binder's
         * end pending): drain it, so that a later wait sees only real events. */
        int drained = wait_port(evtchn_fd, 500);
        (void)drained;
        sprintf(reply, "ok %d", port);
        return;
    }
    if (strcmp(op, "notify") == 0 && n == 2) {
        if (notify(evtchn_fd, (uint32_t)atoi(words[1])) < 0) goto fail;
        strcpy(reply, "ok");
        return;
    }
    if (strcmp(op, "wait") == 0 && n == 3) {
        /* Events of other ports (earlier tests) are dropped on the way. */
        int want = atoi(words[1]), port;
        struct timespec start, now;
        clock_gettime(CLOCK_MONOTONIC, &start);
        long budget = atol(words[2]), spent = 0;
        do {
            port = wait_port(evtchn_fd, (int)(budget - spent));
            if (port == want) { sprintf(reply, "ok %d", port); return; }
            if (port == -1) goto fail;
            clock_gettime(CLOCK_MONOTONIC, &now);
            spent = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        } while (spent < budget);
        strcpy(reply, "err timeout");
        return;
    }
    if (strcmp(op, "unmap") == 0 && n == 2) {
        int r = atoi(words[1]);
        if (r < 0 || r >= nregions || regions[r].fd != gntdev_fd || !regions[r].addr) { strcpy(reply, "err region"); return; }
        struct ioctl_gntdev_unmap_grant_ref op = { .index = regions[r].index, .count = (uint32_t)(regions[r].len / PAGE) };
        if (munmap(regions[r].addr, regions[r].len) < 0 || ioctl(gntdev_fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &op) < 0) goto fail;
        regions[r].addr = NULL;
        strcpy(reply, "ok");
        return;
    }
    if (strcmp(op, "notify-on-unmap") == 0 && n == 4) {
        int r = atoi(words[1]); uint32_t off = (uint32_t)atoi(words[2]);
        if (!valid_region(r, off, 1) || regions[r].fd != gntalloc_fd) { strcpy(reply, "err range"); return; }
        struct ioctl_gntalloc_unmap_notify op = {
            .index = regions[r].index + off, .action = UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT,
            .event_channel_port = (uint32_t)atoi(words[3]) };
        if (ioctl(gntalloc_fd, IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, &op) < 0) goto fail;
        strcpy(reply, "ok");
        return;
    }
    if (strcmp(op, "child-map") == 0 && n == 5) {
        if (child_map((uint32_t)atoi(words[1]), (uint32_t)strtoul(words[2], NULL, 10), (uint32_t)atoi(words[3]),
                      (uint32_t)atoi(words[4]), reply) < 0) goto fail;
        return;
    }
    /* gntdev dma-buf: export needs an auto-translated (PVH/HVM) guest; a PV one answers EINVAL. */
    if (strcmp(op, "export") == 0 && n >= 4 && n - 3 <= MAX_REFS) {
        uint32_t count = (uint32_t)(n - 3);
        size_t size = sizeof(struct ioctl_gntdev_dmabuf_exp_from_refs) + count * sizeof(uint32_t);
        struct ioctl_gntdev_dmabuf_exp_from_refs *exp = calloc(1, size);
        exp->flags = (uint32_t)atoi(words[1]);
        exp->domid = (uint32_t)atoi(words[2]);
        exp->count = count;
        for (uint32_t i = 0; i < count; i++) exp->refs[i] = (uint32_t)strtoul(words[i + 3], NULL, 10);
        int rc = ioctl(gntdev_fd, IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS, exp);
        uint32_t fd = exp->fd;
        free(exp);
        if (rc < 0) goto fail;
        sprintf(reply, "ok %u", fd);
        return;
    }
    if (strcmp(op, "wait-released") == 0 && n == 3) {
        struct ioctl_gntdev_dmabuf_exp_wait_released wait = {
            .fd = (uint32_t)atoi(words[1]), .wait_to_ms = (uint32_t)atoi(words[2]) };
        if (ioctl(gntdev_fd, IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED, &wait) < 0) goto fail;
        strcpy(reply, "ok");
        return;
    }
    if (strcmp(op, "wait-close") == 0 && n == 3) {
        /* A child waits for the release of an exported dma-buf while this
         * process closes the last descriptor of it: the release happens within
         * that close, so only a waiter already blocked can see it. */
        int fd = atoi(words[1]), ready[2];
        if (pipe(ready) < 0) goto fail;
        pid_t pid = fork();
        if (pid < 0) goto fail;
        if (pid == 0) {
            close(fd);
            struct ioctl_gntdev_dmabuf_exp_wait_released wait = { .fd = (uint32_t)fd, .wait_to_ms = (uint32_t)atoi(words[2]) };
            char go = 'w';
            if (write(ready[1], &go, 1) != 1) _exit(EIO);
            _exit(ioctl(gntdev_fd, IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED, &wait) < 0 ? errno : 0);
        }
        close(ready[1]);
        char go;
        ssize_t got = read(ready[0], &go, 1);
        close(ready[0]);
        usleep(300000);  /* the child is in the ioctl by now */
        close(fd);
        int status = 0;
        if (got != 1 || waitpid(pid, &status, 0) < 0) goto fail;
        if (!WIFEXITED(status)) { strcpy(reply, "err the waiter died"); return; }
        if (WEXITSTATUS(status) != 0) { errno = WEXITSTATUS(status); goto fail; }
        strcpy(reply, "ok");
        return;
    }
    if (strcmp(op, "close") == 0 && n == 2) {
        if (close(atoi(words[1])) < 0) goto fail;
        strcpy(reply, "ok");
        return;
    }
    if (strcmp(op, "import") == 0 && n == 4) {  /* import FD COUNT DOMID: grant a dma-buf's pages */
        uint32_t count = (uint32_t)atoi(words[2]);
        if (count == 0 || count > MAX_REFS) { strcpy(reply, "err count"); return; }
        size_t size = sizeof(struct ioctl_gntdev_dmabuf_imp_to_refs) + count * sizeof(uint32_t);
        struct ioctl_gntdev_dmabuf_imp_to_refs *imp = calloc(1, size);
        imp->fd = (uint32_t)atoi(words[1]);
        imp->count = count;
        imp->domid = (uint32_t)atoi(words[3]);
        if (ioctl(gntdev_fd, IOCTL_GNTDEV_DMABUF_IMP_TO_REFS, imp) < 0) { free(imp); goto fail; }
        int at = sprintf(reply, "ok");
        for (uint32_t i = 0; i < count; i++) at += sprintf(reply + at, " %u", imp->refs[i]);
        free(imp);
        return;
    }
    if (strcmp(op, "import-release") == 0 && n == 2) {
        struct ioctl_gntdev_dmabuf_imp_release release = { .fd = (uint32_t)atoi(words[1]) };
        if (ioctl(gntdev_fd, IOCTL_GNTDEV_DMABUF_IMP_RELEASE, &release) < 0) goto fail;
        strcpy(reply, "ok");
        return;
    }
    if (strcmp(op, "kill") == 0 && n == 2) {
        pid_t pid = (pid_t)atoi(words[1]);
        if (kill(pid, SIGKILL) < 0 || waitpid(pid, NULL, 0) < 0) goto fail;
        strcpy(reply, "ok");
        return;
    }
    sprintf(reply, "err unknown command %.100s", op);
    return;
fail:
    sprintf(reply, "err %s: %s", op, strerror(errno ? errno : EIO));
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGCHLD, SIG_DFL);
    char domid_text[32];
    for (int tries = 0; xs_request(XS_READ, "domid", 6, domid_text, sizeof domid_text) < 0; tries++) {
        if (tries > 100) die("xenstore read domid");
        usleep(100000);
    }
    gntalloc_fd = open("/dev/xen/gntalloc", O_RDWR | O_CLOEXEC);
    gntdev_fd = open("/dev/xen/gntdev", O_RDWR | O_CLOEXEC);
    evtchn_fd = open("/dev/xen/evtchn", O_RDWR | O_CLOEXEC);
    if (gntalloc_fd < 0 || gntdev_fd < 0 || evtchn_fd < 0) die("open /dev/xen/*");

    uint32_t control_ref;
    int control = share(gntalloc_fd, 0, 1, &control_ref);
    if (control < 0) die("share the control page");
    volatile uint32_t *seq = (volatile uint32_t *)regions[control].addr;
    volatile uint32_t *done = seq + 1;
    char *command = (char *)regions[control].addr + 8;
    char *reply = (char *)regions[control].addr + REPLY_AT;
    char publish[128];
    int len = snprintf(publish, sizeof publish, "data/gb-peer%c%s %u", 0, domid_text, control_ref);
    if (xs_request(XS_WRITE, publish, (size_t)len, NULL, 0) < 0) die("xenstore write data/gb-peer");
    printf("gb-peer: domain %s, control ref %u\n", domid_text, control_ref);

    uint32_t handled = 0;
    for (;;) {
        uint32_t now = *seq;
        if (now == handled) { usleep(20000); continue; }
        __sync_synchronize();
        char text[1024];
        memcpy(text, command, sizeof text - 1);
        text[sizeof text - 1] = 0;
        char out[2040];
        run(text, out);
        strcpy(reply, out);
        __sync_synchronize();
        *done = now;
        handled = now;
    }
}
