/* durable_subscription.c - conveyor-subscribe --name (docs/contract.md
 * section 13) through the C API of conveyor.h: each event printed and
 * acknowledged once written; or run through a command (--exec: its exit
 * status acknowledges or retries); or answered by the reader (--acks: "ack ID"
 * or "nack ID [REASON]" lines on stdin, up to --window out at once). */
#include "conveyor.h"
#include "core.h"
#include "durable.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Runs cmd with ev on its stdin and the CONVEYOR_* environment, for at most
 * timeout_s, keeping s's partitions meanwhile (conveyor_subscription_poll).
 * Returns 0 when it exited 0, else -1 with why in why (n bytes). */
static int run_exec(conveyor_subscription *s, const char *cmd, const char *name, const conveyor_event *ev,
                    int timeout_s, char *why, size_t n) {
    int fd[2];
    if (pipe(fd) < 0) {
        snprintf(why, n, "pipe: %s", strerror(errno));
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(why, n, "fork: %s", strerror(errno));
        close(fd[0]);
        close(fd[1]);
        return -1;
    }
    if (pid == 0) {
        setpgid(0, 0); /* its own group: a timeout kills what it started too */
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* and the subscriber killed -9 takes it along */
        signal(SIGPIPE, SIG_DFL);
        dup2(fd[0], 0);
        close(fd[0]);
        close(fd[1]);
        char attempt[16];
        snprintf(attempt, sizeof attempt, "%d", ev->attempt);
        setenv("CONVEYOR_SUBSCRIPTION", name, 1);
        setenv("CONVEYOR_EVENT_ID", ev->id, 1);
        setenv("CONVEYOR_EVENT_TYPE", ev->type, 1);
        setenv("CONVEYOR_ATTEMPT", attempt, 1);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    close(fd[0]);
    fcntl(fd[1], F_SETFL, O_NONBLOCK);
    size_t off = 0;
    int64_t deadline = clock_mono_ms() + (int64_t)timeout_s * 1000;
    int status = 0;
    int64_t poll_at = clock_mono_ms() + 1000;
    for (;;) {
        if (clock_mono_ms() >= poll_at) {
            conveyor_subscription_poll(s); /* a failure is said by the next _next, after the command */
            poll_at = clock_mono_ms() + 1000;
        }
        if (fd[1] >= 0 && off < ev->len) {
            ssize_t w = write(fd[1], ev->json + off, ev->len - off);
            if (w > 0) off += (size_t)w;
            else if (w < 0 && errno != EAGAIN && errno != EINTR) off = ev->len; /* it stopped reading */
        }
        if (fd[1] >= 0 && off >= ev->len) {
            close(fd[1]);
            fd[1] = -1;
        }
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid) break;
        if (clock_mono_ms() > deadline || stop) {
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            if (fd[1] >= 0) close(fd[1]);
            snprintf(why, n, stop ? "stopped by a signal" : "timed out after %d s (--exec-timeout)", timeout_s);
            return -1;
        }
        sleep_ms(fd[1] >= 0 ? 1 : 5);
    }
    if (fd[1] >= 0) close(fd[1]);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return 0;
    if (WIFEXITED(status)) snprintf(why, n, "the command exited with status %d", WEXITSTATUS(status));
    else snprintf(why, n, "the command was killed by signal %d", WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    return -1;
}

/* The events out in --acks mode, by id. */
struct out_table {
    conveyor_event **v;
    int n, cap;
};

static void out_add(struct out_table *t, conveyor_event *ev) {
    if (t->n == t->cap) t->v = xrealloc(t->v, (size_t)(t->cap = t->cap ? t->cap * 2 : 64) * sizeof *t->v);
    t->v[t->n++] = ev;
}

static conveyor_event *out_take(struct out_table *t, const char *id) {
    for (int i = 0; i < t->n; i++)
        if (strcmp(t->v[i]->id, id) == 0) {
            conveyor_event *ev = t->v[i];
            t->v[i] = t->v[--t->n];
            return ev;
        }
    return NULL;
}

/* One answer line of the reader. Returns 1 when it settled an event, 0 otherwise. */
static int answer(conveyor_subscription *s, struct out_table *t, char *line) {
    char *save = NULL;
    char *verb = strtok_r(line, " \t\r", &save), *id = strtok_r(NULL, " \t\r", &save);
    char *reason = strtok_r(NULL, "\r", &save);
    if (!verb) return 0;
    bool ack = strcmp(verb, "ack") == 0, nack = strcmp(verb, "nack") == 0;
    if ((!ack && !nack) || !id) {
        fprintf(stderr, "conveyor-subscribe: cannot read the answer '%.80s': write 'ack ID' or 'nack ID [REASON]'\n",
                verb);
        return 0;
    }
    conveyor_event *ev = out_take(t, id);
    if (!ev) {
        fprintf(stderr, "conveyor-subscribe: %s %.40s: no such event is out (answered twice?)\n", verb, id);
        return 0;
    }
    int rc = ack ? conveyor_subscription_ack(s, ev) : conveyor_subscription_nack(s, ev, reason);
    if (rc < 0) fprintf(stderr, "conveyor-subscribe: %s\n", conveyor_subscription_error(s));
    return ack || rc == 1;
}

int durable_run(const struct durable_options *d) {
    signals_stop_sets(&stop);
    signal(SIGPIPE, SIG_IGN);
    struct conveyor_subscription_options o = {.size = sizeof o,
                                              .from = d->from,
                                              .partitions = d->partitions,
                                              .max_attempts = d->max_attempts,
                                              .retry_base_ms = d->retry_base_ms,
                                              .transport = d->transport};
    const char **patterns = xcalloc((size_t)d->npatterns + 1, sizeof *patterns);
    for (int i = 0; i < d->npatterns; i++) patterns[i] = d->patterns[i];
    char err[1024];
    int code = 0;
    conveyor_subscription *s = conveyor_subscription_open(d->config, d->name, patterns, &o, err, sizeof err, &code);
    free(patterns);
    if (!s) {
        fprintf(stderr, "conveyor-subscribe: %s\n", err);
        return code == CONVEYOR_EINVALID ? 2 : 3;
    }
    struct out_table out = {0};
    char buf[8192];
    size_t have = 0;
    bool eof = false, said = false;
    int status = 0;
    long settled = 0;
    int64_t idle_since = clock_mono_ms(), poll_at = 0;
    while (!stop && !eof && (d->count < 0 || settled < d->count)) {
        if (d->timeout_s > 0 && out.n == 0 && clock_mono_ms() - idle_since > d->timeout_s * 1000) {
            status = 4;
            break;
        }
        conveyor_event *ev = NULL;
        if (!d->acks || out.n < d->window) {
            int rc = conveyor_subscription_next(s, d->acks && out.n ? 0 : 250, &ev);
            if (rc < 0) {
                if (!said) fprintf(stderr, "conveyor-subscribe: %s; trying again\n", conveyor_subscription_error(s));
                said = true;
                sleep_ms(1000);
                continue;
            }
            if (said && ev) fprintf(stderr, "conveyor-subscribe: reading again\n");
            if (ev) said = false;
        }
        if (ev) idle_since = clock_mono_ms();
        if (ev && d->exec) {
            char why[300], id[40];
            snprintf(id, sizeof id, "%s", ev->id);
            int rc = run_exec(s, d->exec, d->name, ev, d->exec_timeout_s, why, sizeof why);
            if (stop && rc < 0) break; /* not settled: it comes again */
            int r2 = rc == 0 ? conveyor_subscription_ack(s, ev) : conveyor_subscription_nack(s, ev, why);
            if (rc < 0) fprintf(stderr, "conveyor-subscribe: event %s: %s%s\n", id, why, r2 == 1 ? ": dead-lettered" : "");
            if (r2 < 0) fprintf(stderr, "conveyor-subscribe: %s\n", conveyor_subscription_error(s));
            if (rc == 0 || r2 == 1) settled++;
            continue;
        }
        if (ev) {
            if (printf("%s\n", ev->json) < 0 || fflush(stdout) != 0) break; /* not acked: it comes again */
            if (d->acks) out_add(&out, ev);
            else {
                if (conveyor_subscription_ack(s, ev) < 0)
                    fprintf(stderr, "conveyor-subscribe: %s\n", conveyor_subscription_error(s));
                settled++;
            }
        }
        if (!d->acks) continue;
        /* the reader's answers: what is there now, or up to 100 ms when nothing else is to do */
        if (out.n >= d->window && clock_mono_ms() >= poll_at) { /* a full window: keep the partitions meanwhile */
            if (conveyor_subscription_poll(s) < 0 && !said) {
                fprintf(stderr, "conveyor-subscribe: %s; trying again\n", conveyor_subscription_error(s));
                said = true;
            }
            poll_at = clock_mono_ms() + 1000;
        }
        struct pollfd pfd = {0, POLLIN, 0};
        int wait = ev || out.n < d->window ? 0 : 100;
        if (poll(&pfd, 1, wait) <= 0) continue;
        ssize_t r = read(0, buf + have, sizeof buf - 1 - have);
        if (r <= 0) {
            eof = r == 0 || (errno != EINTR && errno != EAGAIN);
            if (eof && have > 0) { /* a last answer without its newline */
                buf[have] = '\0';
                settled += answer(s, &out, buf);
                have = 0;
            }
            continue;
        }
        have += (size_t)r;
        buf[have] = '\0';
        char *line = buf, *nl;
        while ((nl = strchr(line, '\n'))) {
            *nl = '\0';
            settled += answer(s, &out, line);
            line = nl + 1;
        }
        have = strlen(line);
        memmove(buf, line, have);
        if (have == sizeof buf - 1) have = 0; /* a line too long to be an answer */
    }
    free(out.v); /* what is out and not answered comes again */
    conveyor_subscription_close(s);
    return status;
}
