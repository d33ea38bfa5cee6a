/* redis_heartbeat.c - the Redis backend's liveness key (redis_heartbeat_start,
 * _stop, _refresh). Called by the operations (broker_redis.c); it calls the
 * connection (redis_conn.c) and reads the worker's progress (shared/liveness.c).
 *
 * Liveness. A consuming worker keeps conveyor:worker:<workerId> (its pid, EX
 * heartbeat_ttl); the reaper returns the in-flight list of a worker whose key has
 * expired. The key is refreshed every heartbeat_interval by a thread of the worker
 * (vouch_main), with a Redis connection of its own, not between takes: a batch
 * that runs longer than heartbeat_ttl (a slow lock, many password hashes) keeps
 * its messages. Why a thread in the worker and not the supervisor vouching for its
 * live children: the thread dies with its process (kill -9, OOM: the key expires
 * as before), and it goes on vouching while its worker drains after the
 * supervisor was killed -9 (children get SIGTERM from PR_SET_PDEATHSIG and finish
 * the batch in hand; a supervisor that vouched would stop, and another pool's
 * reaper would hand that batch out while it still ran). It blocks nothing: the
 * worker never waits for it, and the supervisor's loop needs no Redis.
 * A worker stuck for ever must not be vouched for for ever: the thread refreshes
 * only while the worker makes progress, that is, made a call to its broker (noted
 * as the call starts: a Redis command is bounded by its reply timeout, broker.reply_timeout_ms plus its block time) or had a
 * result from PostgreSQL (liveness_watch_db: every result, an error too) within
 * the longest a working worker can go without one: a statement
 * (statement_timeout_ms), a pause inside a transaction (idle_in_transaction_
 * timeout_ms: PostgreSQL then ends the session), a Redis command (its reply timeout
 * timeout), whichever is longest, plus heartbeat_ttl. Past that it stops, logs
 * it, and the key expires: a worker stuck outside the database (or waiting for a
 * database that is away, when it holds nothing unsettled) loses its in-flight
 * messages to the reaper, and its transaction, if one is open, is ended by
 * PostgreSQL, so a copy handed out is not applied twice. The worker's own
 * refresh before each take stays, for the first take and for a thread that
 * cannot refresh.
 */
#include "redis_internal.h"

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The heartbeat thread of one consuming broker (its owner). */
struct vouch {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;       /* signalled by redis_heartbeat_stop */
    bool stop;                 /* under lock */
    struct redis_broker *owner; /* its key and config; heartbeat_at is written by both threads */
    int64_t stall_limit_ms;    /* no progress for longer than this: stop refreshing */
};

/* SETs owner's heartbeat key (this pid, expiring after heartbeat_ttl) over
 * conn, and notes when in owner->heartbeat_at. True, or false when the
 * command failed (why in conn->base.err). */
static bool set_key(struct redis_broker *conn, struct redis_broker *owner) {
    redisReply *rep = redis_conn_cmd(conn, "SET %s %d EX %d", owner->heartbeat_key, (int)getpid(),
                                     owner->base.cfg->heartbeat_ttl_s);
    if (!rep) return false;
    freeReplyObject(rep);
    atomic_store(&owner->heartbeat_at, clock_mono_ms());
    return true;
}

/* Sets the owner's heartbeat key over *conn (opened here when NULL; on failure
 * it stays closed or is re-opened by the next command). Returns 0, or the class
 * of the failure with why in err: the class of the open (redis_conn_open), or
 * CV_ERETRY when the SET failed. The caller treats every class alike: one more
 * failed refresh, tried again at the next interval (a refusal ends the worker
 * through its own connection). */
static int vouch_refresh(struct vouch *v, struct redis_broker **conn, char *err, size_t errlen) {
    const struct cfg *cfg = v->owner->base.cfg;
    int cls;
    if (!*conn && !(*conn = redis_conn_open(cfg, &cls, err, errlen))) return cls; /* a class: always set */
    if (!set_key(*conn, v->owner)) {
        snprintf(err, errlen, "%s", (*conn)->base.err);
        return CV_ERETRY;
    }
    return 0;
}

/* The thread: every heartbeat_interval, refreshes the key while the worker makes
 * progress; logs once when it stops (no progress) and once when it cannot. */
static void *vouch_main(void *arg) {
    struct vouch *v = arg;
    const struct cfg *cfg = v->owner->base.cfg;
    struct redis_broker *conn = NULL; /* its own connection (redis_conn.c), not the worker's */
    bool stalled = false, failing = false;
    char err[512];
    pthread_mutex_lock(&v->lock);
    while (!v->stop) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += cfg->heartbeat_interval_s;
        while (!v->stop && pthread_cond_timedwait(&v->wake, &v->lock, &until) == 0) {}
        if (v->stop) break;
        pthread_mutex_unlock(&v->lock);
        int64_t idle = clock_mono_ms() - liveness_progress_at_ms();
        if (idle > v->stall_limit_ms) {
            if (!stalled)
                log_warn("no progress for %lld s (no broker reply, no database result): no longer refreshing %s; "
                         "what it holds in flight goes back to the queue when the key expires",
                         (long long)idle / 1000, v->owner->heartbeat_key);
            stalled = true;
        } else {
            if (stalled) log_info("progress again: refreshing %s", v->owner->heartbeat_key);
            stalled = false;
            if (vouch_refresh(v, &conn, err, sizeof err) < 0) {
                if (!failing) log_warn("cannot refresh %s: %s; retrying", v->owner->heartbeat_key, err);
                failing = true;
            } else if (failing) {
                log_info("refreshing %s again", v->owner->heartbeat_key);
                failing = false;
            }
        }
        pthread_mutex_lock(&v->lock);
    }
    pthread_mutex_unlock(&v->lock);
    redis_conn_close(conn);
    return NULL;
}

/* Starts the heartbeat thread of a consuming worker (with every signal blocked:
 * they go to the worker's own thread). On failure the worker refreshes the key
 * only between takes, as it always does when one is due, and says so. */
void redis_heartbeat_start(struct redis_broker *r, const struct cfg_queue *q) {
    if (r->vouch) return;
    struct vouch *v = xcalloc(1, sizeof *v);
    v->owner = r;
    /* a Redis command: the reply timeout, plus the longest block (WAIT, BLMOVE) */
    const struct cfg *cfg = r->base.cfg;
    int64_t block = cfg->redis_wait_timeout_ms > cfg->heartbeat_interval_s * 500 ? cfg->redis_wait_timeout_ms
                                                                                 : cfg->heartbeat_interval_s * 500;
    int64_t longest = cfg->broker_reply_timeout_ms + block;
    if (q->statement_timeout_ms > longest) longest = q->statement_timeout_ms;
    if (q->idle_in_transaction_timeout_ms > longest) longest = q->idle_in_transaction_timeout_ms;
    v->stall_limit_ms = longest + r->base.cfg->heartbeat_ttl_s * 1000L;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&v->wake, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&v->lock, NULL);
    liveness_progress();
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&v->thread, NULL, vouch_main, v);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        log_warn("no heartbeat thread (%s): the heartbeat is refreshed between takes only", strerror(rc));
        pthread_cond_destroy(&v->wake);
        pthread_mutex_destroy(&v->lock);
        free(v);
        return;
    }
    r->vouch = v;
}

/* Stops and joins the heartbeat thread, if any (it ends within one Redis command). */
void redis_heartbeat_stop(struct redis_broker *r) {
    struct vouch *v = r->vouch;
    if (!v) return;
    pthread_mutex_lock(&v->lock);
    v->stop = true;
    pthread_cond_signal(&v->wake);
    pthread_mutex_unlock(&v->lock);
    pthread_join(v->thread, NULL);
    pthread_cond_destroy(&v->wake);
    pthread_mutex_destroy(&v->lock);
    free(v);
    r->vouch = NULL;
}

/* Refreshes the worker's liveness key when it is due (vouch_main usually has). */
int redis_heartbeat_refresh(struct redis_broker *r) {
    int64_t now = clock_mono_ms();
    liveness_progress();
    if (r->heartbeat_at && now - r->heartbeat_at < r->base.cfg->heartbeat_interval_s * 1000L) return 0;
    return set_key(r, r) ? 0 : redis_conn_last_error(r);
}

