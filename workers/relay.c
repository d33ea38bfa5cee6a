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

/* Where a claim starts. Published rows leave dead entries at the low end of
 * the outbox_unpublished index until VACUUM; a claim that always began at the
 * lowest id would walk all of them (0.2 ms at 20,000, more with every command
 * published). So a claim starts above a floor: an id published at least
 * FLOOR_LAG_MS ago (between one and two lags ago). A row below the floor can
 * still appear: its transaction took its id before the floor's row was
 * published and committed more than a lag later (a commit stalled that long):
 * a claim from the lowest id every FULL_CLAIM_MS publishes such rows, a second
 * or two late and out of id order, which at-least-once delivery allows. */
#define FLOOR_LAG_MS 500
#define FULL_CLAIM_MS 1000
struct claim_floor {
    int64_t floor;       /* claims start above this id */
    int64_t candidate;   /* the highest id published when the lag began */
    int64_t highest;     /* the highest id published and marked so far */
    int64_t lag_from_ms; /* when candidate was taken */
    int64_t full_at_ms;  /* when the next claim from the lowest id is due */
};

/* The id the next claim starts above: 0 when a full claim is due. */
static int64_t claim_start(struct claim_floor *f) {
    int64_t now = clock_mono_ms();
    if (now >= f->lag_from_ms + FLOOR_LAG_MS) {
        f->floor = f->candidate;
        f->candidate = f->highest;
        f->lag_from_ms = now;
    }
    if (now >= f->full_at_ms) {
        f->full_at_ms = now + FULL_CLAIM_MS;
        return 0;
    }
    return f->floor;
}

/* Publishes up to batch unpublished rows above the floor, in id order, then
 * marks them. Returns the number published, or an error class. */
static int relay_drain(PGconn *db, struct broker *b, int batch, struct claim_floor *f) {
    char limit[16], after[24];
    snprintf(limit, sizeof limit, "%d", batch);
    snprintf(after, sizeof after, "%lld", (long long)claim_start(f));
    const char *p[2] = {after, limit};
    PGresult *r;
    int rc = db_exec(db, "SELECT id, event_id::text, event_type, payload::text FROM outbox "
                         "WHERE published_at IS NULL AND id > $1::bigint ORDER BY id LIMIT $2", 2, p, &r, NULL);
    if (rc < 0) return rc;
    int n = PQntuples(r);
    if (n == 0) {
        PQclear(r);
        return 0;
    }
    struct outgoing_event *ev = calloc((size_t)n, sizeof *ev);
    size_t idlen = 3;
    for (int i = 0; i < n; i++) {
        ev[i].id = PQgetvalue(r, i, 1);
        ev[i].type = PQgetvalue(r, i, 2);
        ev[i].json = PQgetvalue(r, i, 3);
        idlen += strlen(PQgetvalue(r, i, 0)) + 1;
    }
    rc = broker_publish_events(b, ev, n);
    free(ev);
    if (rc < 0) {
        PQclear(r);
        log_warn("publishing events failed: %s", broker_error(b));
        return rc;
    }
    /* {id,id,...}: a bigint[] literal built from the ids the database gave us */
    char *ids = malloc(idlen), *w = ids;
    *w++ = '{';
    for (int i = 0; i < n; i++) w += sprintf(w, "%s%s", i ? "," : "", PQgetvalue(r, i, 0));
    *w++ = '}';
    *w = '\0';
    int64_t last = strtoll(PQgetvalue(r, n - 1, 0), NULL, 10); /* the highest: rows come in id order */
    PQclear(r);
    const char *mp[1] = {ids};
    rc = db_exec(db, "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])", 1, mp, NULL, NULL);
    free(ids);
    if (rc < 0) return rc; /* unmarked: found again by a later claim (a full one at the latest) */
    if (last > f->highest) f->highest = last;
    return n;
}

/* Deletes rows published longer ago than the retention. */
static void relay_prune(PGconn *db, long retention_s) {
    char secs[24];
    snprintf(secs, sizeof secs, "%ld", retention_s);
    const char *p[1] = {secs};
    PGresult *r;
    if (db_exec(db, "DELETE FROM outbox WHERE published_at IS NOT NULL "
                    "AND published_at < now() - make_interval(secs => $1::bigint)", 1, p, &r, NULL) == 0) {
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
static void relay_wait(PGconn *db, int ms) {
    struct pollfd pfd[2] = {{PQsocket(db), POLLIN, 0}, {relay_wake_fd(), POLLIN, 0}};
    PQconsumeInput(db);
    PGnotify *n = PQnotifies(db);
    bool pending = n || poll(pfd, 2, 0) > 0; /* a negative fd (no wake-up) is ignored */
    PQfreemem(n);
    if (pending) usleep(LINGER_US);
    if (pending || poll(pfd, 2, ms) > 0) {
        PQconsumeInput(db);
        for (PGnotify *m; (m = PQnotifies(db)); PQfreemem(m)) {}
        relay_wake_clear();
    }
}

/* Holds the relay lock on db and publishes until stop or a lost connection. */
static bool config_refused; /* a server refused what the configuration says: the relay stops */

static void relay_active(const struct cfg *cfg, PGconn *db) {
    char sql[128];
    snprintf(sql, sizeof sql, "LISTEN \"%s_outbox\"", cfg->prefix);
    if (db_cmd(db, sql) < 0) return;
    /* "published" marks commit without waiting for the disk: one lost in a
     * database crash only means those events are published again, which
     * at-least-once delivery allows (subscribers dedupe by event id) */
    if (db_cmd(db, "SET synchronous_commit TO off") < 0) return;
    /* The claim, the mark and the prune each have their index, and must use
     * it however small the outbox's statistics say it is: a plan made while
     * the outbox was empty (a new database, one just vacuumed empty) is a
     * sequential scan, and the connection keeps that plan until autovacuum
     * next analyzes the outbox (up to a minute), while every claim and mark
     * reads the whole table. */
    if (db_cmd(db, "SET enable_seqscan TO off") < 0) return;
    relay_wake_clear();
    relay_wake_set_active(true); /* the pool's workers wake this relay directly */
    struct broker *b = NULL;
    char err[512];
    int failures = 0;
    int64_t next_prune = clock_mono_ms();
    struct claim_floor floor = {0};
    while (!stop_requested && PQstatus(db) == CONNECTION_OK) {
        int cls;
        if (!b && !(b = broker_open_class(cfg, cfg->events_transport, &cls, err, sizeof err))) {
            if (cls == CV_ECONFIG) {
                log_error("events broker refused the configuration: %s; stopping", err);
                config_refused = true;
                break;
            }
            if (failures == 0) log_warn("events broker unreachable, retrying: %s", err);
            backoff_sleep(backoff_ms(failures++, 100, 5000), &stop_requested);
            continue;
        }
        int n = relay_drain(db, b, cfg->relay_batch, &floor);
        if (n < 0) {
            if (n == CV_ERETRY && PQstatus(db) == CONNECTION_OK) {
                broker_close(b); /* the broker failed: reconnect it */
                b = NULL;
            }
            backoff_sleep(backoff_ms(failures++, 100, 5000), &stop_requested);
            continue;
        }
        if (failures) log_info("relay publishing again");
        failures = 0;
        if (n == cfg->relay_batch) continue;
        if (clock_mono_ms() >= next_prune) {
            relay_prune(db, cfg->outbox_retention_s);
            next_prune = clock_mono_ms() + PRUNE_EVERY_MS;
        }
        relay_wait(db, cfg->relay_poll_ms);
    }
    relay_wake_set_active(false);
    broker_close(b);
}

int relay_run(const struct cfg *cfg) {
    char lock_name[128];
    snprintf(lock_name, sizeof lock_name, "%s.relay", cfg->prefix);
    const char *p[1] = {lock_name};
    bool said_standby = false;
    while (!stop_requested) {
        PGconn *db = db_connect_retry(cfg->database_url, &stop_requested);
        if (!db) {
            config_refused = !stop_requested; /* said by db_connect_retry */
            break;
        }
        while (!stop_requested && PQstatus(db) == CONNECTION_OK) {
            PGresult *r;
            if (db_exec(db, "SELECT pg_try_advisory_lock(hashtext($1))", 1, p, &r, NULL) < 0) break;
            bool got = PQgetvalue(r, 0, 0)[0] == 't';
            PQclear(r);
            if (got) {
                log_info("relay active: publishing the outbox to %s", transport_name(cfg->events_transport));
                said_standby = false;
                relay_active(cfg, db);
                break;
            }
            if (!said_standby) log_info("another relay is active; standing by");
            said_standby = true;
            backoff_sleep(1000, &stop_requested);
        }
        db_close(db); /* releases the lock if held */
        if (config_refused) break;
    }
    log_info("relay stopped");
    return config_refused ? CV_EXIT_CONFIG : 0;
}
