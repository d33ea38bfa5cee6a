/* worker.c - one worker process: take messages (up to prefetch of those
 * already delivered or waiting, in one round trip; when there are none, the
 * first waited for), run their commands batch_size per transaction (batch.c),
 * then settle each message: ack after the commit, a delay (retry) or a dead
 * letter.
 *
 * A transient failure (connection lost, serialization failure, deadlock,
 * timeout) sends the message to the broker's delay with exponential backoff;
 * after max_attempts handler starts it is dead-lettered (retries_exhausted).
 * A database error the handler did not anticipate is dead-lettered at once
 * (handler_error). The worker never waits with a message in hand.
 *
 * The database's own failure (breaker.c: refused, too many connections, shut
 * down, the connection lost mid-transaction) is no command's: what the worker
 * holds then is handed back uncounted (broker_release), even a command whose
 * handler had started in the transaction that was lost (its work was rolled
 * back with it; one that committed before the loss is found done). After
 * breaker.failures in a row the pool's breaker opens: the worker hands back
 * what its broker delivered ahead (broker_stop_consuming), closes its
 * connections and takes nothing until its turn to probe, or until another
 * worker's probe closed the breaker.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

volatile sig_atomic_t stop_requested;

struct worker {
    const struct cfg *cfg;
    const struct cfg_queue *q;
    struct db *db;
    struct broker *broker;
    struct batch batch;    /* the transactions, on db */
    long jobs;             /* commands handled, for max_jobs */
    bool stood_down;       /* broker closed while the database breaker was open */
    int db_failures;       /* this worker's connects that failed in a row (its own backoff and log) */
    bool probing;          /* it holds the breaker's half-open probe (breaker_turn) */
    int index;             /* its number among its queue's workers in the pool (which lanes it serves) */
};


/* Drops a broken database connection so that the next batch reconnects. */
static void db_check(struct worker *w) {
    if (w->db && !db_ok(w->db)) {
        log_warn("database connection lost; reconnecting");
        db_close(w->db);
        w->db = NULL;
    }
}

/* Moves the message to the dead letters, retrying (with capped backoff) while
 * the broker is away or refuses (a dead-letter queue deleted, Redis out of
 * memory): a message is never left half-settled, where a later multiple ack
 * could take it. On stop it is handed back to its queue (broker_requeue).
 * A dead letter is counted (scoreboard) under cmd's type (cmd NULL: not known). */
static void settle_dead(struct worker *w, const struct delivery *d, const char *reason, const char *error,
                        int attempts, const struct envelope *cmd) {
    log_cmd(LOG_WARN, cmd, "dead-lettered (%s): %s", reason, error);
    char dead_id[ID_LEN + 1];
    id_new(dead_id); /* RabbitMQ: the letter's row in the dead-letter index */
    bool indexed = w->q->transport == TRANSPORT_RABBITMQ;
    for (int attempt = 0; !stop_requested; attempt++) {
        if (broker_dead_letter(w->broker, d, reason, error, attempts, indexed ? dead_id : NULL) == 0) {
            scoreboard_outcome(cmd ? cmd->type : NULL, SB_DEAD);
            /* after the broker has it: an index row never names a letter that is not there
             * (a failure leaves the index one short; its next reader sees it and rebuilds) */
            db_check(w);
            if (indexed && w->db && dead_index_add(w->db, w->q, dead_id, d, reason, error, attempts) < 0)
                log_cmd(LOG_WARN, cmd, "dead letter not indexed (%s); the next reader of the index rebuilds it",
                        db_errstr(w->db));
            return;
        }
        log_warn("cannot dead-letter yet: %s", broker_error(w->broker));
        backoff_sleep(backoff_ms(attempt, 100, 5000), &stop_requested);
    }
    /* stopping: hand it back (settled, so that the held multiple ack of a
     * later batch cannot take it); it comes back redelivered */
    if (broker_requeue(w->broker, d) < 0)
        log_cmd(LOG_WARN, cmd, "requeue on stop failed (%s); the broker returns it when the connection closes",
                broker_error(w->broker));
}

/* Hands the message back to its queue uncounted (broker_release): the
 * database failed, not its command. A failure is logged: it stays in flight,
 * and comes back redelivered (RabbitMQ, when the connection closes; Redis, by
 * the reaper), counted as one start. */
static void release_uncounted(struct worker *w, const struct delivery *d, const struct envelope *env) {
    if (broker_release(w->broker, d) < 0)
        log_cmd(LOG_WARN, env, "handing it back failed (%s); the broker returns it, marked redelivered",
                broker_error(w->broker));
}

/* The database breaker opened: hands back what the broker delivered ahead
 * (uncounted), closes the broker and database connections (a RabbitMQ consumer
 * left open would hold its prefetch; closing would return them marked
 * redelivered), and marks the worker stood down. buf holds max deliveries. */
static void stand_down(struct worker *w, struct delivery *buf, int max) {
    db_close(w->db);
    w->db = NULL;
    if (!w->broker) return; /* paused, or stood down already */
    int n = broker_stop_consuming(w->broker, buf, max);
    for (int i = 0; i < n; i++) {
        release_uncounted(w, &buf[i], NULL);
        delivery_free(&buf[i]);
    }
    log_msg(LOG_DEBUG, NULL, "the database breaker is open: handed back %d message%s delivered ahead; taking "
            "nothing", n > 0 ? n : 0, n == 1 ? "" : "s");
    broker_close(w->broker);
    w->broker = NULL;
    w->stood_down = true;
}

/* After a failed attempt: a refusal (CV_EREFUSED: a constraint violation or
 * another database error the handler did not anticipate, which the same
 * command would meet again) is dead-lettered at once as handler_error; a
 * transient failure is recorded, then retried later or, after max_attempts,
 * dead-lettered as retries_exhausted. */
static void attempt_failed(struct worker *w, const struct batch_item *it) {
    const struct delivery *d = &it->d;
    const struct envelope *env = &it->env;
    int attempts = it->attempts;
    char error[600];
    snprintf(error, sizeof error, "%s: %s", cv_strerror(it->rc), it->error ? it->error : "");
    if (it->rc != CV_ERETRY) {
        settle_dead(w, d, "handler_error", error, attempts, env);
        return;
    }
    bool retried = batch_will_retry(w->q, it);
    db_check(w);
    if (w->db) {
        char n[16];
        snprintf(n, sizeof n, "%d", attempts);
        const char *p[3] = {env->id, error, n};
        (void)db_exec(w->db, "INSERT INTO command_attempts (id, attempts, last_error) VALUES ($1, $3, $2) "
                             "ON CONFLICT (id) DO UPDATE SET last_error = $2, updated_at = now()", 3, p, NULL);
        /* a failure is logged; the count it would have kept is the broker's redelivery then */
    }
    if (!retried) {
        settle_dead(w, d, "retries_exhausted", error, attempts, env);
        return;
    }
    int delay = backoff_ms(attempts - 1, w->cfg->retry_base_ms, w->cfg->retry_max_ms);
    log_cmd(LOG_WARN, env, "%s attempt %d of %d failed (%s); retrying in %d ms", env->type, attempts,
            w->q->max_attempts, error, delay);
    for (int i = 0; !stop_requested; i++) {
        int brc = broker_retry(w->broker, d, delay);
        if (brc == 0) {
            scoreboard_outcome(env->type, SB_RETRIED);
            return;
        }
        log_warn("cannot schedule the retry yet: %s", broker_error(w->broker));
        if (brc != CV_ERETRY) break;
        backoff_sleep(backoff_ms(i, 100, 5000), &stop_requested);
    }
    /* could not park it: hand it back now */
    if (broker_requeue(w->broker, d) < 0)
        log_cmd(LOG_WARN, env, "requeue failed too (%s); the broker returns it when the connection closes",
                broker_error(w->broker));
}


/* Settles the outcomes pending in this worker's slot (left by a predecessor
 * killed between a COMMIT and its counting, or by a connection lost during a
 * COMMIT): asks the database whether their transaction committed, and folds
 * them into the counts or drops them. A transaction still in progress (its
 * backend has not yet seen its client die) is asked again every 100 ms, for at
 * most the queue's statement and idle-in-transaction timeouts and 10 s; then,
 * or when the database no longer knows the transaction, they are dropped with
 * a warning. Returns 0 when nothing is pending any more, or the error class of
 * the query when the connection failed (CV_ERETRY: they stay pending; the
 * caller reconnects). */
static int count_reconcile(struct worker *w) {
    uint64_t xid = scoreboard_pending_xid();
    if (!xid) return 0;
    char x[24];
    snprintf(x, sizeof x, "%llu", (unsigned long long)xid);
    const char *p[1] = {x};
    int64_t deadline =
        clock_mono_ms() + w->q->statement_timeout_ms + w->q->idle_in_transaction_timeout_ms + 10000;
    while (!stop_requested) {
        PGresult *r = NULL;
        int rc = db_exec(w->db, "SELECT pg_xact_status($1::xid8)", 1, p, &r);
        if (rc < 0) {
            if (!db_ok(w->db)) return rc;
            log_warn("the outcomes of transaction %s are not counted: the database does not know it (%s)", x,
                     db_errstr(w->db));
            scoreboard_pending_drop();
            return 0;
        }
        const char *status = PQgetisnull(r, 0, 0) ? "unknown" : PQgetvalue(r, 0, 0);
        if (strcmp(status, "committed") == 0) {
            log_info("counted the outcomes of transaction %s, committed by a worker that did not count them", x);
            scoreboard_pending_fold();
        } else if (strcmp(status, "in progress") != 0 || clock_mono_ms() > deadline) {
            if (strcmp(status, "aborted") != 0)
                log_warn("the outcomes of transaction %s are not counted: its status is %s", x, status);
            scoreboard_pending_drop();
        }
        PQclear(r);
        if (!scoreboard_pending_xid()) return 0;
        backoff_sleep(100, &stop_requested);
    }
    return 0;
}

/* Parses one delivered message and settles at once what cannot run here
 * (invalid, or a type this worker does not take). Returns true when it can. */
static bool admit(struct worker *w, struct batch_item *it) {
    char err[256];
    if (envelope_parse(it->d.body, it->d.len, (size_t)w->cfg->max_message_bytes, it->d.message_id, &it->env, err,
                       sizeof err) < 0) {
        settle_dead(w, &it->d, "invalid_envelope", err, 0, NULL);
        return false;
    }
    envelope_trace_header(&it->env, it->d.traceparent); /* the RabbitMQ header, when the body has none */
    /* A type this build has no handler for, or that this queue's `commands` does
     * not list (an older deployment), waits as a dead letter for an upgrade. */
    it->handler = handler_find(it->env.type);
    if (!it->handler || cfg_queue_for(w->cfg, it->env.type) != w->q) {
        if (!it->handler) snprintf(err, sizeof err, "no handler for command type '%s'", it->env.type);
        else snprintf(err, sizeof err, "queue '%s' does not take command type '%s' (its commands in the config)",
                      w->q->name, it->env.type);
        settle_dead(w, &it->d, "unknown_command", err, 0, &it->env);
        return false;
    }
    handler_lock_key(it->handler, it->env.payload, it->key);
    rate_limit_bind(w->cfg, it);
    return true;
}

/* Runs the n messages of a batch (batch_process), then settles each: acks
 * after the commit (one ack for a batch that went through whole), retries or
 * dead letters; when the database failed (breaker_dependency_failed), hands
 * back uncounted those it did not settle, and tells the breaker. Returns true
 * when the database failed (or was gone already), false when it served the batch. */
static bool process_batch(struct worker *w, struct batch_item *items, int n) {
    struct batch_item **v = xmalloc((size_t)n * sizeof *v);
    int nv = 0;
    for (int i = 0; i < n; i++)
        if (admit(w, &items[i])) v[nv++] = &items[i];
    w->batch.db = w->db;
    /* those not due yet are parked and acked, never run (parking.c); when
     * parking fails, the whole batch is handed back below (none may run early) */
    int parked = nv > 0 && w->db ? parking_park(w->db, w->q, v, nv) : 0;
    if (parked > 0) {
        int kept = 0;
        for (int i = 0; i < nv; i++)
            if (!v[i]->parked) v[kept++] = v[i];
        nv = kept;
    }
    /* no database (lost with an earlier batch of this take), or it failed
     * before anything ran: hand them back and reconnect; uncounted when the
     * database failed, else requeued (they come back redelivered, and one
     * never started before is then counted as started once) */
    bool lost = false;
    if (nv > 0 && (!w->db || parked < 0 || batch_process(&w->batch, v, nv) < 0)) {
        lost = breaker_dependency_failed(w->db);
        if (lost && w->db) breaker_failure(w->cfg, db_errstr(w->db));
        db_check(w);
        for (int i = 0; i < nv; i++)
            if (lost) release_uncounted(w, &v[i]->d, &v[i]->env);
            else if (broker_requeue(w->broker, &v[i]->d) < 0)
                log_cmd(LOG_WARN, &v[i]->env, "requeue failed (%s); the broker returns it when the connection "
                        "closes", broker_error(w->broker));
        nv = 0;
    } else if (nv > 0 && !db_ok(w->db)) {
        /* the transaction was lost with its connection: the database's failure,
         * not the commands'. Those it did not settle go back uncounted, even
         * one whose handler had started (its work was rolled back with the
         * transaction; if the COMMIT went through, the next take finds it done) */
        lost = true;
        breaker_failure(w->cfg, db_errstr(w->db));
        db_check(w);
        for (int i = 0; i < nv; i++)
            if (v[i]->live && v[i]->rc < 0) {
                release_uncounted(w, &v[i]->d, &v[i]->env);
                v[i]->live = false; /* settled: neither retried nor acked below */
            }
    }
    /* failures first: a retry acks its own delivery */
    for (int i = 0; i < nv; i++) {
        if (v[i]->exhausted) /* started max_attempts times (some of them killed their worker) */
            settle_dead(w, &v[i]->d, "retries_exhausted", v[i]->error, v[i]->attempts, &v[i]->env);
        else if (v[i]->live && v[i]->rc < 0)
            attempt_failed(w, v[i]);
    }
    struct delivery *acks = xmalloc((size_t)n * sizeof *acks);
    int nacks = 0;
    for (int i = 0; i < n; i++) /* in arrival order */
        if ((items[i].live && items[i].rc >= 0) || items[i].parked) acks[nacks++] = items[i].d;
    /* one ack for a batch that went through whole; else one each */
    bool whole = nacks == n;
    for (int sent = 0; sent < nacks;) {
        /* Redis: the in-flight entries must go, or they would come back after a restart */
        int rc = whole ? broker_ack_batch(w->broker, acks, nacks) : broker_ack(w->broker, &acks[sent]);
        if (rc == CV_ERETRY && !stop_requested) {
            log_warn("ack failed (%s); retrying", broker_error(w->broker));
            backoff_sleep(500, &stop_requested);
            continue;
        }
        sent += whole ? nacks : 1;
    }
    free(acks);
    free(v);
    return lost;
}

/* True when the worker should exit and be replaced (max_jobs, max_rss_mb). */
static bool should_recycle(struct worker *w) {
    if (w->cfg->max_jobs > 0 && w->jobs >= w->cfg->max_jobs) {
        log_info("recycling after %ld commands (max_jobs)", w->jobs);
        return true;
    }
    if (w->cfg->max_rss_mb > 0) {
        long long bytes = 0; /* 0 when it cannot be read */
        (void)sb_resident_bytes(getpid(), &bytes);
        long mb = (long)(bytes >> 20);
        if (mb > w->cfg->max_rss_mb) {
            log_info("recycling at %ld MB resident (max_rss_mb %d)", mb, w->cfg->max_rss_mb);
            return true;
        }
    }
    return false;
}

/* How consume_open ended: not an error class, and not an exit status
 * (open_exit_status maps it to worker_run's). */
enum open_result {
    OPEN_OK,      /* consuming: w->broker open */
    OPEN_STOPPED, /* a stop was asked for while it waited for the broker */
    OPEN_CONFIG,  /* the broker refused the configuration (logged) */
    OPEN_FAILED,  /* consuming failed (logged) */
};

/* worker_run's exit status after r: 0 (OPEN_OK, OPEN_STOPPED), CV_EXIT_CONFIG
 * (OPEN_CONFIG) or 1 (OPEN_FAILED). */
static int open_exit_status(enum open_result r) {
    switch (r) {
    case OPEN_OK:
    case OPEN_STOPPED: return 0;
    case OPEN_CONFIG: return CV_EXIT_CONFIG;
    case OPEN_FAILED: break;
    }
    return 1;
}

/* Opens the broker (waiting while it is away) and starts consuming the queue:
 * OPEN_OK with w->broker open, else w->broker NULL and why (enum open_result). */
static enum open_result consume_open(struct worker *w, const char *worker_id) {
    char err[512];
    if (!(w->broker = broker_open_wait(w->cfg, w->q->transport, &stop_requested, err, sizeof err))) {
        if (!err[0]) return OPEN_STOPPED;
        log_error("broker refused the configuration: %s; stopping", err);
        return OPEN_CONFIG;
    }
    if (broker_consume_as(w->broker, w->q, worker_id, w->index) < 0) {
        log_error("cannot consume %s: %s", w->q->name, broker_error(w->broker));
        broker_close(w->broker);
        w->broker = NULL;
        return OPEN_FAILED;
    }
    log_info("worker %s consuming queue %s (%s)", worker_id, w->q->name, transport_name(w->q->transport));
    return OPEN_OK;
}

/* How long a worker with nothing in hand waits for a message before it looks
 * at the pause page again (queue_pause.c: at most 300 ms old). */
#define TAKE_WAIT_MS 300

/* A paused queue (conveyor-admin queue pause; queue_pause.c): the worker
 * settles what it holds, then closes its broker connection and takes nothing
 * until the queue is resumed, when it opens a new one. Closing is how a
 * RabbitMQ consumer stops for certain: basic.qos cannot stop one, and a
 * consumer left open would keep what RabbitMQ delivered ahead of it (up to
 * prefetch) unacked for as long as the pause lasts. Closed, RabbitMQ puts those
 * back on the queue at once (they come back marked redelivered, so each is
 * counted as one handler start when it is taken again) and delivers nothing
 * more. On Redis the connection's heartbeat thread stops and its key is
 * deleted; its in-flight list is empty (what it took is settled, and held acks
 * are sent on close). Returns true while the queue is paused (having waited
 * 100 ms; 20 ms while the pool has not read the state yet: a worker started
 * under a pause takes nothing before it knows), or when the database was lost
 * reading it (w->db is then NULL);
 * false once it is running, with w->broker open
 * (*opened then tells whether opening it failed or was stopped: OPEN_OK when
 * it opened, or when it was open already). */
static bool paused_now(struct worker *w, const char *worker_id, enum open_result *opened) {
    *opened = OPEN_OK;
    if (queue_pause_refresh(w->db) < 0) { /* logged; the state last read stays */
        db_check(w);
        if (!w->db) return true; /* lost: the loop reconnects before anything is taken */
    }
    if (!queue_pause_known()) { /* another process of the pool is reading it for the first time */
        backoff_sleep(20, &stop_requested);
        return true;
    }
    if (queue_paused(w->q)) {
        if (w->broker) {
            log_info("queue %s is paused: worker %s takes nothing until it is resumed", w->q->name, worker_id);
            broker_close(w->broker);
            w->broker = NULL;
        }
        backoff_sleep(100, &stop_requested);
        return true;
    }
    if (!w->broker) {
        log_info("queue %s is resumed: worker %s takes from it again", w->q->name, worker_id);
        *opened = consume_open(w, worker_id);
    }
    return false;
}

/* Connects the worker's database when it has none, in one try: its results
 * watched as progress (the Redis heartbeat), its statements, locks and idle
 * transactions bounded, the outcomes a predecessor left reconciled
 * (count_reconcile). Returns 0 when w->db is ready; CV_ECONFIG when the
 * database refused the configuration (logged); CV_ERETRY when it could not
 * connect (the breaker is told; the first of a series is logged) or after a
 * failure on the new connection (logged; it is closed); w->db is NULL then,
 * and the caller tries again after a pause. A connection that works clears
 * the breaker's count of failures (breaker_success), unless it is the probe's:
 * its command decides. */
static int db_ready(struct worker *w) {
    if (w->db) return 0;
    char err[512];
    int cls = CV_ERETRY;
    if (!(w->db = db_connect_class(w->cfg->database_url, &cls, err, sizeof err))) {
        if (cls != CV_ERETRY) {
            char shown[512];
            url_redact(w->cfg->database_url, shown, sizeof shown);
            log_error("database (%s): %s; stopping (a configuration error is not retried)", shown, err);
            return CV_ECONFIG;
        }
        if (w->db_failures++ == 0) log_warn("database unreachable, waiting for it: %s", err);
        breaker_failure(w->cfg, err);
        return CV_ERETRY;
    }
    if (w->db_failures) log_info("database is back");
    w->db_failures = 0;
    liveness_watch_db(db_conn(w->db));
    char limits[192];
    snprintf(limits, sizeof limits, "SET statement_timeout TO %d; SET lock_timeout TO %d; "
             "SET idle_in_transaction_session_timeout TO %d", w->q->statement_timeout_ms, w->q->lock_timeout_ms,
             w->q->idle_in_transaction_timeout_ms);
    if (db_cmd(w->db, limits) < 0 || count_reconcile(w) < 0) { /* logged */
        if (breaker_dependency_failed(w->db)) breaker_failure(w->cfg, db_errstr(w->db));
        db_close(w->db);
        w->db = NULL;
        return CV_ERETRY;
    }
    if (!w->probing) breaker_success(); /* closed: the count of failures starts again (a probe needs its command) */
    return 0;
}

/* The probe found no command waiting: one statement on the new connection
 * stands for it (success closes the breaker; a failure opens it again). */
static void probe_without_command(struct worker *w) {
    if (db_cmd(w->db, "SELECT 1") == 0) {
        breaker_success();
        return;
    }
    if (breaker_dependency_failed(w->db)) breaker_failure(w->cfg, db_errstr(w->db));
    db_check(w);
}

/* Before a take: while the database breaker is open, stands down and waits
 * (buf holds max deliveries, for stand_down); else connects the database (w->db)
 * and, after a stand-down, consumes anew (w->broker). Sets w->probing when this
 * take is the breaker's probe. Says whether the worker may take (TAKE_GO), waited
 * or met a failed database (TAKE_AGAIN: logged; the caller goes round again),
 * or is to stop with *status (TAKE_STOP: a refused configuration; a stop while
 * opening). */
enum take_ready { TAKE_GO, TAKE_AGAIN, TAKE_STOP };
static enum take_ready ready_to_take(struct worker *w, const char *worker_id, struct delivery *buf, int max, int *status) {
    enum breaker_turn turn = breaker_turn();
    w->probing = turn == BREAKER_PROBE;
    if (turn == BREAKER_WAIT) { /* the database breaker is open: take nothing */
        stand_down(w, buf, max);
        backoff_sleep(100, &stop_requested);
        return TAKE_AGAIN;
    }
    int drc = db_ready(w); /* take nothing while the database is away */
    if (drc == CV_ECONFIG) {
        *status = CV_EXIT_CONFIG;
        return TAKE_STOP;
    }
    if (drc < 0) { /* capped backoff; the breaker opens meanwhile after its failures */
        backoff_sleep(backoff_ms(w->db_failures, 100, 5000), &stop_requested);
        return TAKE_AGAIN;
    }
    if (w->stood_down) { /* the breaker let it take again: consume anew */
        w->stood_down = false;
        enum open_result back = consume_open(w, worker_id);
        if (back != OPEN_OK) {
            *status = open_exit_status(back);
            return TAKE_STOP;
        }
    }
    return TAKE_GO;
}

/* A laned worker: the oldest createdAt it holds per lane, of the n items in
 * hand and what its broker buffers, into its scoreboard slot (pool_load.c
 * reports it: the lane's oldest age on RabbitMQ). Nothing for a queue without
 * lanes or on Redis. */
static void report_lane_oldest(struct worker *w, const struct batch_item *items, int n) {
    if (w->q->lanes < 2) return;
    int64_t ms[LANE_CLASSES * LANES_MAX] = {0};
    int nl = LANE_CLASSES * w->q->lanes;
    if (!broker_lane_oldest(w->broker, ms)) return; /* Redis reads its lanes' heads */
    for (int i = 0; i < n; i++) {
        const struct delivery *d = &items[i].d;
        if (d->created_ms > 0 && d->lane >= 0 && d->lane < nl && (!ms[d->lane] || d->created_ms < ms[d->lane]))
            ms[d->lane] = d->created_ms;
    }
    scoreboard_lane_oldest(ms, nl);
}

int worker_run(const struct cfg *cfg, const struct cfg_queue *q, const char *worker_id, int index) {
    struct worker w = {.cfg = cfg, .q = q, .index = index};
    batch_init(&w.batch, cfg, q);
    enum open_result opened = consume_open(&w, worker_id);
    if (opened != OPEN_OK) return open_exit_status(opened);
    scoreboard_state(SB_IDLE, 0);

    int broker_failures = 0;
    /* one take hands over up to the prefetch (what is already delivered or
     * waiting: one Redis round trip and AOF sync for several transactions) */
    int take_max = q->prefetch > q->batch_size ? q->prefetch : q->batch_size;
    struct batch_item *items = xcalloc((size_t)take_max, sizeof *items);
    struct delivery *extra = xcalloc((size_t)take_max, sizeof *extra);
    int status = 0;
    while (!stop_requested) {
        enum take_ready ready = ready_to_take(&w, worker_id, extra, take_max, &status);
        if (ready == TAKE_STOP) break;
        if (ready == TAKE_AGAIN) continue; /* the loop ends here when it was a stop */
        enum open_result reopened;
        if (paused_now(&w, worker_id, &reopened)) {
            if (w.probing && w.db) probe_without_command(&w); /* not held up by a pause */
            continue;
        }
        if (reopened != OPEN_OK) { /* stopped, or the broker refused the configuration */
            status = open_exit_status(reopened);
            break;
        }
        /* a batch is what is already delivered; when nothing is, the first one is
         * waited for (at most TAKE_WAIT_MS, so that a pause is seen within a
         * second: the pause page's age, this wait, and the broker's own timer),
         * and what came with it taken too */
        int want = take_max; /* and no more than max_jobs lets it run before it is recycled */
        if (cfg->max_jobs > 0 && cfg->max_jobs - w.jobs < want) want = (int)(cfg->max_jobs - w.jobs);
        if (want < 1 || w.probing) want = 1; /* a probe is one command */
        int n = 0, rc = broker_take(w.broker, extra, want);
        if (rc == 0 && (rc = broker_next(w.broker, &extra[0], TAKE_WAIT_MS)) > 0) {
            int more = broker_take(w.broker, &extra[1], want - 1);
            rc = more < 0 ? 1 : 1 + more;
        }
        for (int i = 0; i < rc; i++) items[n++].d = extra[i];
        if (rc == CV_ECONFIG) {
            log_error("broker refused the configuration: %s; stopping", broker_error(w.broker));
            status = CV_EXIT_CONFIG;
            break;
        }
        if (rc < 0) {
            if (broker_failures == 0) log_warn("broker lost: %s; reconnecting", broker_error(w.broker));
            backoff_sleep(backoff_ms(broker_failures++, 100, 5000), &stop_requested);
            continue;
        }
        if (broker_failures) log_info("broker is back");
        broker_failures = 0;
        if (n == 0) {
            if (w.probing) probe_without_command(&w);
            continue;
        }
        /* a pause that came while it waited is seen before the next take: what
         * it holds now runs (handing it back would spend an attempt of each) */
        log_msg(LOG_DEBUG, NULL, "took %d message%s", n, n == 1 ? "" : "s");
        scoreboard_state(SB_BUSY, n);
        report_lane_oldest(&w, items, n);
        /* in transactions of batch_size, in arrival order; all of them, even
         * on stop (they are in hand) */
        bool lost = false;
        for (int off = 0; off < n; off += q->batch_size)
            lost |= process_batch(&w, &items[off], n - off < q->batch_size ? n - off : q->batch_size);
        if (!lost) breaker_success(); /* closes the breaker after a probe */
        for (int i = 0; i < n; i++) {
            batch_item_forget(&items[i]);
            delivery_free(&items[i].d);
            envelope_free(&items[i].env);
            memset(&items[i], 0, sizeof items[i]);
        }
        w.jobs += n;
        scoreboard_state(SB_IDLE, 0); /* idle: its current command is no longer read */
        report_lane_oldest(&w, NULL, 0);  /* what it still buffers */
        if (should_recycle(&w)) break;
    }
    free(items);
    free(extra);
    log_info("worker %s stopped", worker_id);
    broker_close(w.broker);
    db_close(w.db);
    return status;
}
