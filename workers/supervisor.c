/* supervisor.c - forks the pool (the workers of every queue and one relay),
 * restarts a child that dies (backing off when it crash-loops), and on
 * SIGTERM / SIGINT stops the children, waits for them, and exits 0.
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

#define STABLE_MS 5000 /* a child that lived this long was not crash-looping */
#define RESTART_BASE_MS 250 /* backoff of a crash-looping child: 250 ms, doubling ... */
#define RESTART_CAP_MS 10000 /* ... up to 10 s */

enum child_kind { CHILD_WORKER, CHILD_RELAY, CHILD_REAPER };
static const char *kind_name[] = {"worker", "relay", "reaper"};

struct child {
    pid_t pid;                     /* 0 while not running */
    enum child_kind kind;
    const struct cfg_queue *queue; /* the worker's queue */
    char worker_id[160];
    int64_t started_ms, restart_at_ms;
    int crashes;                   /* consecutive quick deaths */
};

/* In the child: default signal mask, SIGTERM/SIGINT request a drain, and the
 * child dies with its supervisor. Never returns. */
static void child_main(const struct cfg *cfg, struct child *c, const sigset_t *mask) {
    signals_stop_sets(&stop_requested);
    signal(SIGHUP, SIG_IGN);
    signal(SIGCHLD, SIG_DFL);
    sigprocmask(SIG_UNBLOCK, mask, NULL);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    log_init(kind_name[c->kind]);
    int rc = c->kind == CHILD_WORKER ? worker_run(cfg, c->queue, c->worker_id)
           : c->kind == CHILD_RELAY  ? relay_run(cfg)
                                     : reaper_run(cfg);
    exit(rc); /* exit, not _exit: flushes stdio, and LeakSanitizer checks the child */
}

static void spawn(const struct cfg *cfg, struct child *c, const sigset_t *mask) {
    pid_t pid = fork();
    if (pid < 0) {
        log_error("fork failed: %s", strerror(errno));
        c->restart_at_ms = clock_mono_ms() + 1000;
        return;
    }
    if (pid == 0) child_main(cfg, c, mask);
    c->pid = pid;
    c->started_ms = clock_mono_ms();
}

int supervisor_run(const struct cfg *cfg) {
    bool redis_queues = false;
    int n = 1;
    for (int i = 0; i < cfg->nqueues; i++) {
        n += cfg->queues[i].workers;
        redis_queues |= cfg->queues[i].transport == TRANSPORT_REDIS;
    }
    n += redis_queues;
    struct child *kids = calloc((size_t)n, sizeof *kids);
    char host[64];
    gethostname(host, sizeof host);
    host[sizeof host - 1] = '\0';
    int k = 0;
    for (int i = 0; i < cfg->nqueues; i++)
        for (int j = 0; j < cfg->queues[i].workers; j++, k++) {
            kids[k].queue = &cfg->queues[i];
            /* stable across restarts, so a restarted worker finds what its predecessor left in flight */
            snprintf(kids[k].worker_id, sizeof kids[k].worker_id, "%s-%d-%s-%d", host, (int)getpid(),
                     cfg->queues[i].name, j);
        }
    kids[k].kind = CHILD_RELAY;
    snprintf(kids[k++].worker_id, sizeof kids[0].worker_id, "relay");
    if (redis_queues) {
        kids[k].kind = CHILD_REAPER;
        snprintf(kids[k++].worker_id, sizeof kids[0].worker_id, "reaper");
    }

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    sigprocmask(SIG_BLOCK, &mask, NULL);

    for (int i = 0; i < n; i++) spawn(cfg, &kids[i], &mask);
    log_info("pool started: %d workers, a relay%s", n - 1 - redis_queues, redis_queues ? " and a reaper" : "");

    bool stopping = false;
    int64_t deadline = 0;
    for (;;) {
        struct timespec tick = {0, 200 * 1000000L};
        siginfo_t si;
        int sig = sigtimedwait(&mask, &si, &tick);
        if ((sig == SIGTERM || sig == SIGINT) && !stopping) {
            stopping = true;
            deadline = clock_mono_ms() + cfg->shutdown_timeout_s * 1000L;
            log_info("%s: draining the pool (up to %d s)", sig == SIGTERM ? "SIGTERM" : "SIGINT",
                     cfg->shutdown_timeout_s);
            for (int i = 0; i < n; i++)
                if (kids[i].pid) kill(kids[i].pid, SIGTERM);
        } else if (sig == SIGHUP) {
            log_warn("SIGHUP: reloading queues.conf is not supported yet; restart the pool instead");
        }
        pid_t pid;
        int status;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            for (int i = 0; i < n; i++) {
                struct child *c = &kids[i];
                if (c->pid != pid) continue;
                c->pid = 0;
                if (stopping) break;
                int64_t now = clock_mono_ms();
                if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
                    /* a worker recycling itself (max_jobs, max_rss_mb): replace it at once */
                    log_info("%s %s recycled; starting a fresh one", kind_name[c->kind], c->worker_id);
                    c->crashes = 0;
                    c->restart_at_ms = now;
                    break;
                }
                c->crashes = now - c->started_ms < STABLE_MS ? c->crashes + 1 : 0;
                int delay = c->crashes ? backoff_ms(c->crashes - 1, RESTART_BASE_MS, RESTART_CAP_MS) : 0;
                c->restart_at_ms = now + delay;
                if (WIFSIGNALED(status))
                    log_error("%s %s died of signal %d; restarting in %d ms", kind_name[c->kind],
                              c->worker_id, WTERMSIG(status), delay);
                else
                    log_error("%s %s exited with status %d; restarting in %d ms", kind_name[c->kind],
                              c->worker_id, WEXITSTATUS(status), delay);
                break;
            }
        }
        int running = 0;
        for (int i = 0; i < n; i++) {
            if (!kids[i].pid && !stopping && clock_mono_ms() >= kids[i].restart_at_ms) spawn(cfg, &kids[i], &mask);
            running += kids[i].pid != 0;
        }
        if (stopping && running == 0) break;
        if (stopping && clock_mono_ms() > deadline) {
            log_warn("shutdown timeout: killing %d children (their messages return to the queue)", running);
            for (int i = 0; i < n; i++)
                if (kids[i].pid) kill(kids[i].pid, SIGKILL);
            deadline = clock_mono_ms() + 60000;
        }
    }
    free(kids);
    log_info("pool stopped");
    return 0;
}
