/* relay.c - the outbox relay: publishes unpublished outbox rows in id order,
 * with confirms, then marks them published. One relay is active at a time
 * (a session advisory lock); the others stand by. Woken by the pool's own
 * workers through relay_wake.c, by NOTIFY from other pools' workers, and by a
 * slow poll as a safety net.
 */
#include "workers.h"

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PRUNE_EVERY_MS 60000
#define DEDUP_PRUNE_BUDGET_MS 1000 /* per pass: the relay goes back to publishing after that */

/* Where a claim starts, and why events of one aggregate go out in commit
 * order: workers/claim_floor.c (the same argument serves the forwarder). */

/* Publishes up to batch unpublished rows above the floor (from the lowest id
 * if from_start), in id order, then marks them, and moves the floor
 * (floor_advance). Returns the number published, or an error class (the floor
 * is left as it was). */
static int relay_drain(struct db *db, struct broker *b, int batch, struct claim_floor *f, bool from_start) {
    char limit[16], after[24];
    snprintf(limit, sizeof limit, "%d", batch);
    snprintf(after, sizeof after, "%lld", from_start ? 0LL : (long long)f->floor);
    const char *p[2] = {after, limit};
    PGresult *r;
    /* one row with NULL event columns when there is nothing to publish */
    /* L through pg_sequence_last_value, which reads the sequence under its
     * buffer lock: a plain SELECT from outbox_id_seq reads it without, and can
     * catch a nextval that is writing its WAL record, while the tuple holds
     * the value logged ahead (up to 32 ids not handed out yet): the floor
     * would then pass ids that transactions begun after the mark still take
     * (docs/decisions.md, "No belt": the rows once left below the floor) */
    int rc = db_exec(db, "SELECT coalesce(pg_sequence_last_value('outbox_id_seq'::regclass), 0), "
                         "pg_snapshot_xmin(pg_current_snapshot())::text, "
                         "o.id, o.event_id::text, o.event_type, o.payload::text, o.payload->>'traceparent', "
                         "o.aggregate_id::text "
                         "FROM (SELECT 1) one LEFT JOIN LATERAL ("
                         "SELECT id, event_id, event_type, payload, aggregate_id FROM outbox "
                         "WHERE published_at IS NULL AND id > $1::bigint ORDER BY id LIMIT $2) o ON true "
                         "ORDER BY o.id",
                     2, p, &r);
    if (rc < 0) return rc;
    struct claim_horizon h = {strtoll(PQgetvalue(r, 0, 0), NULL, 10), strtoull(PQgetvalue(r, 0, 1), NULL, 10)};
    int n = PQgetisnull(r, 0, 2) ? 0 : PQntuples(r);
    if (n == 0) {
        PQclear(r);
        claim_floor_advance(f, h, 0, batch, 0, 0);
        return 0;
    }
    struct outgoing_event *ev = calloc((size_t)n, sizeof *ev);
    const char **row_ids = calloc((size_t)n, sizeof *row_ids);
    if (!ev || !row_ids) { /* out of memory: the rows wait for a later claim */
        free(ev);
        free(row_ids);
        PQclear(r);
        return CV_ERETRY;
    }
    if (from_start && f->floor > 0 && strtoll(PQgetvalue(r, 0, 2), NULL, 10) <= f->floor) {
        for (int i = 0; i < n && strtoll(PQgetvalue(r, i, 2), NULL, 10) <= f->floor; i++) f->below++;
        log_warn("the relay found unpublished outbox rows below its claim floor (id %s <= %lld): publishing them "
                 "now, after later ones", PQgetvalue(r, 0, 2), (long long)f->floor);
    }
    for (int i = 0; i < n; i++) {
        ev[i].id = PQgetvalue(r, i, 3);
        ev[i].type = PQgetvalue(r, i, 4);
        ev[i].json = PQgetvalue(r, i, 5);
        ev[i].traceparent = PQgetisnull(r, i, 6) ? NULL : PQgetvalue(r, i, 6);
        ev[i].aggregate_id = PQgetvalue(r, i, 7);
        row_ids[i] = PQgetvalue(r, i, 2);
    }
    rc = broker_publish_events(b, ev, n);
    for (int i = 0; i < n && rc == 0; i++) scoreboard_event_published(ev[i].type);
    free(ev);
    char *ids = rc < 0 ? NULL : db_array(row_ids, n); /* a bigint[] literal of the ids the database gave us */
    free(row_ids);
    if (rc < 0) {
        PQclear(r);
        log_warn("publishing events failed: %s", broker_error(b));
        return rc;
    }
    int64_t last = strtoll(PQgetvalue(r, n - 1, 2), NULL, 10); /* the highest: rows come in id order */
    PQclear(r);
    const char *mp[1] = {ids};
    rc = db_exec(db, "WITH marked AS (UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])) "
                     "SELECT pg_current_xact_id()::text",
                 1, mp, &r);
    free(ids);
    if (rc < 0) return rc; /* unmarked: above the floor, which waits for them, so found again */
    claim_floor_advance(f, h, n, batch, last, strtoull(PQgetvalue(r, 0, 0), NULL, 10));
    PQclear(r);
    return n;
}

/* Deletes rows published longer ago than the retention. */
static void relay_prune(struct db *db, long retention_s) {
    char secs[24];
    snprintf(secs, sizeof secs, "%ld", retention_s);
    const char *p[1] = {secs};
    PGresult *r;
    if (db_exec(db, "DELETE FROM outbox WHERE published_at IS NOT NULL "
                    "AND published_at < now() - make_interval(secs => $1::bigint)", 1, p, &r) == 0) {
        if (strcmp(PQcmdTuples(r), "0") != 0) log_info("pruned %s published outbox rows", PQcmdTuples(r));
        PQclear(r);
    }
}

/* Waits up to ms for a NOTIFY or a wake-up from the pool's workers, and
 * consumes what woke it. One already pending when the relay finished a pass
 * means commits are coming faster than it publishes: it lingers LINGER_US
 * first, so that the next pass takes more rows (one claim, one window of
 * confirms and one mark for several commits instead of for one or two), at
 * the cost of that much latency under load only; an idle relay is woken at once. */
#define LINGER_US 2000
static void relay_wait(struct db *db, int ms) {
    PGconn *conn = db_conn(db);
    struct pollfd pfd[2] = {{PQsocket(conn), POLLIN, 0}, {relay_wake_fd(), POLLIN, 0}};
    PQconsumeInput(conn);
    PGnotify *n = PQnotifies(conn);
    bool pending = n || poll(pfd, 2, 0) > 0; /* a negative fd (no wake-up) is ignored */
    PQfreemem(n);
    if (pending) usleep(LINGER_US);
    if (pending || poll(pfd, 2, ms) > 0) {
        PQconsumeInput(conn);
        for (PGnotify *m; (m = PQnotifies(conn)); PQfreemem(m)) {}
        relay_wake_clear();
    }
}

/* The longest a stopping relay goes on publishing what is left in the outbox. */
#define STOP_DRAIN_MS 10000

/* On stop (the pool's workers have exited: supervisor.c): publishes every
 * unpublished row through the open broker b, the first claim from the
 * outbox's start (it finds nothing below the floor while the argument holds,
 * and says so if it does), until none is left, a publish fails, or
 * STOP_DRAIN_MS have passed. What is left then (a broker away, a bound hit)
 * waits for the next active relay; it is logged. */
static void relay_stop_drain(const struct cfg *cfg, struct db *db, struct broker *b, struct claim_floor *f) {
    int64_t deadline = clock_mono_ms() + STOP_DRAIN_MS;
    long total = 0;
    int n = 0;
    for (bool first = true; clock_mono_ms() < deadline && (n = relay_drain(db, b, cfg->relay_batch, f, first)) > 0;
         first = false)
        total += n;
    if (n < 0 || clock_mono_ms() >= deadline)
        log_warn("relay stopping with events left in the outbox (%s): the next active relay publishes them",
                 n < 0 ? "publishing failed" : "its drain's 10 s bound");
    else if (total > 0)
        log_info("relay published %ld event%s left in the outbox before stopping", total, total == 1 ? "" : "s");
}

/* How long the active relay may fail to publish (events waiting, the broker
 * silent, unreachable or refusing them) before it gives up the lock: twice
 * broker.reply_timeout_ms, so that a move to another node of the list (one
 * reply timeout on the silent node, then a publish on the next) fits in it. */
static int give_up_ms(const struct cfg *cfg) { return 2 * cfg->broker_reply_timeout_ms; }

/* Holds the relay lock on db and publishes until stop, a lost connection, a
 * deadline without publishing, or a refused configuration; says which. */
static enum singleton_end relay_active(const struct cfg *cfg, struct db *db) {
    char sql[128];
    snprintf(sql, sizeof sql, "LISTEN \"%s_outbox\"", cfg->prefix);
    if (db_cmd(db, sql) < 0) return SINGLETON_LOST;
    /* "published" marks commit without waiting for the disk: one lost in a
     * database crash only means those events are published again, which
     * at-least-once delivery allows (subscribers dedupe by event id) */
    if (db_cmd(db, "SET synchronous_commit TO off") < 0) return SINGLETON_LOST;
    /* The claim, the mark and the prune each have their index, and must use
     * it however small the outbox's statistics say it is: a plan made while
     * the outbox was empty (a new database, one just vacuumed empty) is a
     * sequential scan, and the connection keeps that plan until autovacuum
     * next analyzes the outbox (up to a minute), while every claim and mark
     * reads the whole table. */
    if (db_cmd(db, "SET enable_seqscan TO off") < 0) return SINGLETON_LOST;
    /* ... and the penalty enable_seqscan adds to any sequential scan left in
     * a plan can put a statement far above jit_above_cost: a claim once spent
     * about 90 ms compiling */
    if (db_cmd(db, "SET jit TO off") < 0) return SINGLETON_LOST;
    relay_wake_clear();
    relay_wake_set_active(true); /* the pool's workers wake this relay directly */
    struct broker *b = NULL;
    char err[512];
    int failures = 0;
    int64_t failing_since = 0; /* monotonic ms of the first failure since the last publish (0: none) */
    int64_t next_prune = clock_mono_ms();
    struct claim_floor floor = {0};
    enum singleton_end end = SINGLETON_LOST;
    while (!stop_requested && db_ok(db)) {
        pool_load_report(db, cfg); /* at most once a second: conveyor-admin stats' in flight */
        int cls = 0;
        if (!b && !(b = broker_open_class(cfg, cfg->events_transport, &cls, err, sizeof err)) && cls == CV_ECONFIG) {
            log_error("events broker refused the configuration: %s; stopping", err);
            end = SINGLETON_CONFIG_REFUSED;
            break;
        }
        if (!b && !failures) log_warn("events broker unreachable: %s; retrying", err);
        int n = b ? relay_drain(db, b, cfg->relay_batch, &floor, false) : CV_ERETRY;
        if (n < 0) {
            if (!failing_since) failing_since = clock_mono_ms();
            if (clock_mono_ms() - failing_since >= give_up_ms(cfg) && db_ok(db)) {
                log_warn("the relay could not publish for %lld ms (%s): giving up the relay lock, so that another "
                         "pool's relay takes over; standing by", (long long)(clock_mono_ms() - failing_since),
                         b ? broker_error(b) : err);
                end = SINGLETON_GAVE_UP;
                break;
            }
            if (n == CV_ERETRY && db_ok(db)) {
                broker_close(b); /* the broker failed: reconnect it */
                b = NULL;
            }
            backoff_sleep(backoff_ms(failures++, 100, 5000), &stop_requested);
            continue;
        }
        if (failures) log_info("relay publishing again");
        failures = 0;
        failing_since = 0;
        if (n == cfg->relay_batch) continue;
        if (clock_mono_ms() >= next_prune) {
            relay_prune(db, cfg->outbox_retention_s);
            (void)dedup_prune(db, cfg, DEDUP_PRUNE_BUDGET_MS); /* a failure is logged; the next pass tries again */
            next_prune = clock_mono_ms() + PRUNE_EVERY_MS;
        }
        relay_wait(db, cfg->relay_poll_ms);
    }
    if (stop_requested && b && db_ok(db)) relay_stop_drain(cfg, db, b, &floor);
    log_info("relay no longer active: its claim floor moved %ld times (last to id %lld); rows found below it: %ld",
             floor.moves, (long long)floor.floor, floor.below);
    relay_wake_set_active(false);
    broker_close(b);
    return end;
}

/* Standing by: the pool's in-flight figure is still reported (conveyor-admin stats). */
static void relay_standing_by(const struct cfg *cfg, struct db *db) { pool_load_report(db, cfg); }

static const struct singleton relay_singleton = {
    .name = "relay",
    .doing = "publishing the outbox",
    .active = relay_active,
    .standing_by = relay_standing_by,
    .stopping = pool_load_forget,
    .gave_up_wait_ms = give_up_ms,
};

int relay_run(const struct cfg *cfg) { return singleton_run(cfg, &relay_singleton); }
