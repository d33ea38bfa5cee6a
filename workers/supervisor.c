/* supervisor.c - forks the pool (the workers of every queue, one relay, a
 * timekeeper, a reaper when a queue is on Redis, a sorter when a laned queue is
 * on RabbitMQ, and the HTTP listener when http.listen is
 * set: http.c), restarts a child that dies (backing off
 * when it crash-loops), reloads queues.conf on SIGHUP, and on SIGTERM / SIGINT
 * stops the children (the workers first, then the relay, which publishes
 * what they committed while draining, then the HTTP listener), waits for
 * them, and exits 0.
 *
 * Reload: the new configuration is checked first (a bad file changes nothing);
 * then a new generation of children starts, and the old children are asked to
 * drain and exit one at a time. Old and new have different worker ids, so no
 * message in flight is taken from a worker that is still finishing it.
 *
 * Metrics: the scoreboard (scoreboard.c) is mapped before the first fork;
 * each child position has a slot that its restarts keep, and the supervisor
 * writes each slot's pid, state and restart counts. On SIGTERM the HTTP
 * listener is stopped last, so /readyz says "draining" while the rest drains.
 *
 * Children die with the supervisor: PR_SET_PDEATHSIG sends them SIGTERM when it
 * dies, even of kill -9, and they drain (a Redis worker goes on refreshing its own
 * heartbeat meanwhile: shared/redis_heartbeat.c), so no orphan goes on taking messages.
 */
#include "workers.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define STABLE_MS 5000        /* a child that lived this long was not crash-looping */
#define RESTART_BASE_MS 250   /* backoff of a crash-looping child: 250 ms, doubling ... */
#define RESTART_CAP_MS 10000  /* ... up to 10 s */

enum child_kind { CHILD_WORKER, CHILD_RELAY, CHILD_REAPER, CHILD_HTTP, CHILD_TIMEKEEPER, CHILD_SORTER, CHILD_FORWARD };
static const char *const kind_name[] = {"worker", "relay", "reaper", "http", "timekeeper", "sorter", "forward"};

struct child {
    pid_t pid;                     /* 0 while not running */
    enum child_kind kind;
    const struct cfg_queue *queue; /* the worker's queue */
    char worker_id[160];
    int index;               /* a worker's number among its queue's workers; a forwarder's producer */
    int64_t started_ms, restart_at_ms;
    int crashes;                   /* consecutive quick deaths */
    int slot;                      /* its scoreboard slot, or -1 */
};

struct pool {
    struct cfg *cfg;
    struct child *kids;
    int nkids, generation;
    pid_t *retiring;               /* children of older generations, stopped one at a time */
    int nretiring;
    pid_t retiring_now;            /* the one asked to stop, or 0 */
    sigset_t mask;
};

/* In the child: default signal mask, SIGTERM/SIGINT request a drain, and the
 * child dies with its supervisor (parent: its pid before the fork). Never returns. */
static void child_main(const struct cfg *cfg, struct child *c, const sigset_t *mask, pid_t parent) {
    signals_stop_sets(&stop_requested);
    signal(SIGHUP, SIG_IGN);
    signal(SIGCHLD, SIG_DFL);
    sigprocmask(SIG_UNBLOCK, mask, NULL);
    (void)prctl(PR_SET_PDEATHSIG, SIGTERM); /* fails only for an invalid signal */
    if (getppid() != parent) stop_requested = 1; /* it died before the prctl: no signal will come */
    /* the name ps and top show (15 bytes): cv-worker-<queue>, cv-relay, cv-reaper, cv-timekeeper, cv-sorter,
     * cv-forward */
    char comm[16];
    snprintf(comm, sizeof comm, "cv-%s%s%s", kind_name[c->kind], c->kind == CHILD_WORKER ? "-" : "",
             c->kind == CHILD_WORKER ? c->queue->name : "");
    prctl(PR_SET_NAME, comm);
    log_init(kind_name[c->kind]);
    scoreboard_attach(c->slot);
    broker_stall_attach(scoreboard_mine()); /* its broker waits are noted in the same slot */
    int rc = c->kind == CHILD_WORKER ? worker_run(cfg, c->queue, c->worker_id, c->index)
           : c->kind == CHILD_RELAY  ? relay_run(cfg)
           : c->kind == CHILD_HTTP   ? http_run(cfg)
           : c->kind == CHILD_TIMEKEEPER ? timekeeper_run(cfg)
           : c->kind == CHILD_SORTER ? lane_sorter_run(cfg)
           : c->kind == CHILD_FORWARD ? forwarder_run(cfg, c->index)
                                     : reaper_run(cfg);
    exit(rc); /* exit, not _exit: flushes stdio, and LeakSanitizer checks the child */
}

static void spawn(struct pool *p, struct child *c) {
    pid_t parent = getpid();
    scoreboard_spawning(c->slot);
    pid_t pid = fork();
    if (pid < 0) {
        log_error("fork failed: %s", strerror(errno));
        c->restart_at_ms = clock_mono_ms() + 1000;
        return;
    }
    if (pid == 0) child_main(p->cfg, c, &p->mask, parent);
    c->pid = pid;
    c->started_ms = clock_mono_ms();
    scoreboard_started(c->slot, pid);
}

/* The children p->cfg asks for, started. */
static void start_generation(struct pool *p) {
    const struct cfg *cfg = p->cfg;
    bool redis_queues = false;
    int n = 2; /* the relay and the timekeeper */
    for (int i = 0; i < cfg->nqueues; i++) {
        n += cfg->queues[i].workers;
        redis_queues |= cfg->queues[i].transport == TRANSPORT_REDIS;
    }
    bool sorter = lane_sorter_needed(cfg);
    n += redis_queues;
    n += sorter;
    n += cfg->nproducers;
    n += cfg->http_listen != NULL;
    p->kids = xcalloc((size_t)n, sizeof *p->kids);
    p->nkids = n;
    p->generation++;
    char host[64];
    if (gethostname(host, sizeof host) != 0) snprintf(host, sizeof host, "localhost");
    host[sizeof host - 1] = '\0';
    int k = 0;
    for (int i = 0; i < cfg->nqueues; i++)
        for (int j = 0; j < cfg->queues[i].workers; j++, k++) {
            p->kids[k].queue = &cfg->queues[i];
            p->kids[k].slot = scoreboard_assign(SB_WORKER, &cfg->queues[i], j);
            p->kids[k].index = j;
            /* stable across restarts, so a restarted worker finds what its predecessor left in
             * flight; a new generation (reload) gets new ids */
            char gen[16] = "";
            if (p->generation > 1) snprintf(gen, sizeof gen, ".%d", p->generation);
            snprintf(p->kids[k].worker_id, sizeof p->kids[k].worker_id, "%s-%d%s-%s-%d", host, (int)getpid(), gen,
                     cfg->queues[i].name, j);
        }
    p->kids[k].kind = CHILD_RELAY;
    p->kids[k].slot = scoreboard_assign(SB_RELAY, NULL, 0);
    snprintf(p->kids[k++].worker_id, sizeof p->kids[0].worker_id, "relay");
    p->kids[k].kind = CHILD_TIMEKEEPER;
    p->kids[k].slot = SB_NO_SLOT;
    snprintf(p->kids[k++].worker_id, sizeof p->kids[0].worker_id, "timekeeper");
    if (redis_queues) {
        p->kids[k].kind = CHILD_REAPER;
        p->kids[k].slot = scoreboard_assign(SB_REAPER, NULL, 0);
        snprintf(p->kids[k++].worker_id, sizeof p->kids[0].worker_id, "reaper");
    }
    if (sorter) {
        p->kids[k].kind = CHILD_SORTER;
        p->kids[k].slot = SB_NO_SLOT;
        snprintf(p->kids[k++].worker_id, sizeof p->kids[0].worker_id, "sorter");
    }
    for (int i = 0; i < cfg->nproducers; i++, k++) {
        p->kids[k].kind = CHILD_FORWARD;
        p->kids[k].slot = SB_NO_SLOT;
        p->kids[k].index = i;
        snprintf(p->kids[k].worker_id, sizeof p->kids[0].worker_id, "forward-%s", cfg->producers[i].name);
    }
    if (cfg->http_listen) { /* last: on SIGTERM it stops after the others (supervisor_run) */
        p->kids[k].kind = CHILD_HTTP;
        p->kids[k].slot = SB_NO_SLOT;
        snprintf(p->kids[k++].worker_id, sizeof p->kids[0].worker_id, "http");
    }
    for (int i = 0; i < n; i++) spawn(p, &p->kids[i]);
    log_info("pool started: %d workers, a relay, a timekeeper%s%s, %d forwarder%s%s",
             n - 2 - redis_queues - sorter - cfg->nproducers - (cfg->http_listen != NULL),
             redis_queues ? ", a reaper" : "", sorter ? ", a sorter" : "", cfg->nproducers,
             cfg->nproducers == 1 ? "" : "s", cfg->http_listen ? " and an HTTP listener" : "");
}

void pool_order_fields(struct cfg *c) {
    for (int i = 0; i < c->nqueues; i++)
        for (int j = 0; j < c->queues[i].ncommands; j++) {
            const struct handler *h = handler_find(c->queues[i].commands[j]);
            cfg_set_order_field(c, c->queues[i].commands[j], h ? h->order_field : NULL);
        }
}

/* SIGHUP: a checked new configuration, a new generation, the old one retired. */
static void reload(struct pool *p) {
    struct cfg next;
    char err[1024];
    if (cfg_load(p->cfg->path, &next, err, sizeof err) < 0) {
        log_error("SIGHUP: %s; keeping the running configuration", err);
        return;
    }
    pool_order_fields(&next);
    if (broker_declare_topology(&next, err, sizeof err) < 0) {
        log_error("SIGHUP: cannot declare the new RabbitMQ topology (%s); keeping the running configuration", err);
        cfg_free(&next);
        return;
    }
    log_info("SIGHUP: %s reloaded; replacing the pool's children one by one", p->cfg->path);
    pid_t *retiring = realloc(p->retiring, (size_t)(p->nretiring + p->nkids) * sizeof *p->retiring);
    if (!retiring) {
        log_error("SIGHUP: out of memory; keeping the running configuration");
        cfg_free(&next);
        return;
    }
    p->retiring = retiring;
    for (int i = 0; i < p->nkids; i++)
        if (p->kids[i].pid) p->retiring[p->nretiring++] = p->kids[i].pid;
        else scoreboard_release(p->kids[i].slot); /* waiting for a restart: nothing runs in it */
    free(p->kids);
    cfg_free(p->cfg);
    *p->cfg = next;
    start_generation(p);
}

/* Asks the next retiring child to drain, once the previous one is gone. */
static void retire_next(struct pool *p) {
    if (p->retiring_now || p->nretiring == 0) return;
    p->retiring_now = p->retiring[--p->nretiring];
    kill(p->retiring_now, SIGTERM);
}

/* Handles the exit of pid. */
static void reaped(struct pool *p, pid_t pid, int status, bool stopping) {
    relay_wake_forget(pid);
    if (pid == p->retiring_now) {
        p->retiring_now = 0;
        scoreboard_exited(pid, -1, true);
        return;
    }
    for (int i = 0; i < p->nretiring; i++)
        if (p->retiring[i] == pid) {
            p->retiring[i] = p->retiring[--p->nretiring];
            scoreboard_exited(pid, -1, true);
            return;
        }
    for (int i = 0; i < p->nkids; i++) {
        struct child *c = &p->kids[i];
        if (c->pid != pid) continue;
        c->pid = 0;
        bool refused = WIFEXITED(status) && WEXITSTATUS(status) == CV_EXIT_CONFIG;
        scoreboard_exited(pid, stopping ? -1
                               : WIFSIGNALED(status) ? SB_RESTART_SIGNAL
                               : refused ? SB_RESTART_CONFIG
                               : WIFEXITED(status) && WEXITSTATUS(status) == 0 ? SB_RESTART_RECYCLED
                                                                                : SB_RESTART_EXIT, false);
        if (stopping) return;
        int64_t now = clock_mono_ms();
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
            /* a worker recycling itself (max_jobs, max_rss_mb): replace it at once */
            log_info("%s %s recycled; starting a fresh one", kind_name[c->kind], c->worker_id);
            c->crashes = 0;
            c->restart_at_ms = now;
            return;
        }
        /* a child stopped by a configuration error (a password changed while running) backs off
         * however long it ran: it fails again until the setting is fixed */
        c->crashes = refused || now - c->started_ms < STABLE_MS ? c->crashes + 1 : 0;
        int delay = c->crashes ? backoff_ms(c->crashes - 1, RESTART_BASE_MS, RESTART_CAP_MS) : 0;
        c->restart_at_ms = now + delay;
        if (WIFSIGNALED(status))
            log_error("%s %s died of signal %d; restarting in %d ms%s", kind_name[c->kind], c->worker_id,
                      WTERMSIG(status), delay, c->crashes > 3 ? " (crash loop)" : "");
        else if (refused)
            log_error("%s %s stopped on a configuration error; restarting in %d ms", kind_name[c->kind],
                      c->worker_id, delay);
        else
            log_error("%s %s exited with status %d; restarting in %d ms%s", kind_name[c->kind], c->worker_id,
                      WEXITSTATUS(status), delay, c->crashes > 3 ? " (crash loop)" : "");
        return;
    }
}

int supervisor_run(struct cfg *cfg) {
    struct pool p = {.cfg = cfg};
    sigemptyset(&p.mask);
    sigaddset(&p.mask, SIGCHLD);
    sigaddset(&p.mask, SIGTERM);
    sigaddset(&p.mask, SIGINT);
    sigaddset(&p.mask, SIGHUP);
    sigprocmask(SIG_BLOCK, &p.mask, NULL);
    if (!relay_wake_init()) log_warn("no shared wake-up for the relay (%s); workers NOTIFY it", strerror(errno));
    if (!scoreboard_init(cfg)) log_warn("no scoreboard (%s): the pool's commands are not counted", strerror(errno));
    start_generation(&p);

    bool stopping = false, relay_told = false;
    int64_t deadline = 0;
    for (;;) {
        struct timespec tick = {0, 200 * 1000000L};
        siginfo_t si;
        scoreboard_tick();
        int sig = sigtimedwait(&p.mask, &si, &tick);
        if ((sig == SIGTERM || sig == SIGINT) && !stopping) {
            stopping = true;
            deadline = clock_mono_ms() + p.cfg->shutdown_timeout_s * 1000L;
            log_info("%s: draining the pool (up to %d s)", sig == SIGTERM ? "SIGTERM" : "SIGINT",
                     p.cfg->shutdown_timeout_s);
            scoreboard_set_flags(true);
            /* the relay stays until the workers are gone, so that it publishes
             * what they commit while they drain; the HTTP listener stays,
             * saying /readyz 503, until the rest is gone */
            for (int i = 0; i < p.nkids; i++)
                if (p.kids[i].pid && p.kids[i].kind != CHILD_HTTP && p.kids[i].kind != CHILD_RELAY)
                    kill(p.kids[i].pid, SIGTERM);
            for (int i = 0; i < p.nretiring; i++) kill(p.retiring[i], SIGTERM);
        } else if (sig == SIGHUP && !stopping) {
            reload(&p);
        }
        pid_t pid;
        int status;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) reaped(&p, pid, status, stopping);
        if (!stopping) retire_next(&p);
        int running = p.nretiring + (p.retiring_now != 0), listeners = 0, relays = 0;
        for (int i = 0; i < p.nkids; i++) {
            struct child *c = &p.kids[i];
            if (!c->pid && !stopping && clock_mono_ms() >= c->restart_at_ms) spawn(&p, c);
            running += c->pid != 0;
            listeners += c->pid != 0 && c->kind == CHILD_HTTP;
            relays += c->pid != 0 && c->kind == CHILD_RELAY;
        }
        if (stopping && !relay_told && running == listeners + relays) { /* the workers are gone */
            relay_told = true; /* it publishes what is left (bounded: relay.c), then exits */
            for (int i = 0; i < p.nkids; i++)
                if (p.kids[i].pid && p.kids[i].kind == CHILD_RELAY) kill(p.kids[i].pid, SIGTERM);
        }
        if (stopping && running > 0 && running == listeners)
            for (int i = 0; i < p.nkids; i++)
                if (p.kids[i].pid) kill(p.kids[i].pid, SIGTERM); /* SIGTERM again is harmless */
        if (stopping && running == 0) break;
        if (stopping && clock_mono_ms() > deadline) {
            log_warn("shutdown timeout: killing %d children (their messages return to the queue)", running);
            for (int i = 0; i < p.nkids; i++)
                if (p.kids[i].pid) kill(p.kids[i].pid, SIGKILL);
            for (int i = 0; i < p.nretiring; i++) kill(p.retiring[i], SIGKILL);
            if (p.retiring_now) kill(p.retiring_now, SIGKILL);
            deadline = clock_mono_ms() + 60000;
        }
    }
    free(p.kids);
    free(p.retiring);
    log_info("pool stopped");
    return 0;
}
