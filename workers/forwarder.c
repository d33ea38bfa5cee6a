/* forwarder.c - the producer's outbox forwarder (cv-forward): publishes the
 * pending rows of a producer database's conveyor.outbound (sql/producer/, put
 * there by conveyor-admin producer install; filled by conveyor.enqueue in the
 * producer's own transactions) in id order, with confirms, to the queues that
 * route their types, then marks them forwarded; a row no queue routes, or one
 * that is no valid command, is marked failed with the reason (kept, listed by
 * conveyor-admin producer status, sent again by producer retry).
 *
 * Every pool runs one forwarder per entry of `producers`; one is active per
 * producer database: the holder of a session advisory lock taken in THAT
 * database (singleton.c), so that the lock lives and dies with the session
 * that reads and marks the rows. The rows go out in the relay's order
 * (claim_floor.c: ids taken after the transaction id, one at a time): two
 * transactions that touch one row of the producer's (an order, a product)
 * have their commands published in their commit order.
 *
 * What waits is counted in the producer database about once a second, by the
 * active forwarder and by those standing by, and written to Conveyor's
 * forward_state table (sql/0013), which /metrics, /api/producers, the
 * dashboard and conveyor-admin stats read.
 */
#include "workers.h"

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PRUNE_EVERY_MS 60000
#define REPORT_EVERY_MS 1000
#define FULL_RETRY_MS 1000 /* a full queue's refused rows are tried again after this */

static const struct cfg_producer *producer; /* this process's producer (forwarder_run) */
static struct db *state_db;                 /* Conveyor's database, for forward_state; opened on use */
static int64_t next_report_ms;

/* Counts what waits in the producer database (db) and writes it to
 * forward_state in Conveyor's database, at most once a second. Failures are
 * logged at debug and tried again at the next report: the counts are a view. */
static void forward_report(const struct cfg *cfg, struct db *db) {
    if (clock_mono_ms() < next_report_ms) return;
    next_report_ms = clock_mono_ms() + REPORT_EVERY_MS;
    PGresult *r;
    if (db_exec(db, "SELECT (SELECT count(*) FROM conveyor.outbound WHERE state = 'pending')::text, "
                    "(SELECT count(*) FROM conveyor.outbound WHERE state = 'failed')::text, "
                    "(SELECT extract(epoch FROM now() - min(created_at)) FROM conveyor.outbound "
                    "WHERE state = 'pending' AND id = (SELECT min(id) FROM conveyor.outbound WHERE state = 'pending'))::text",
                0, NULL, &r) < 0)
        return;
    char pending[24], failed[24], age[32];
    snprintf(pending, sizeof pending, "%s", PQgetvalue(r, 0, 0));
    snprintf(failed, sizeof failed, "%s", PQgetvalue(r, 0, 1));
    snprintf(age, sizeof age, "%s", PQgetisnull(r, 0, 2) ? "0" : PQgetvalue(r, 0, 2));
    PQclear(r);
    if (state_db && !db_ok(state_db)) {
        db_close(state_db);
        state_db = NULL;
    }
    char err[256];
    if (!state_db && !(state_db = db_connect(cfg->database_url, err, sizeof err))) {
        log_debug("forward state not written: %s", err);
        return;
    }
    const char *p[4] = {producer->name, pending, failed, age};
    (void)db_exec(state_db, "INSERT INTO forward_state (producer, pending, failed, oldest_age_s, updated_at) "
                            "VALUES ($1, $2::bigint, $3::bigint, $4::double precision, now()) "
                            "ON CONFLICT (producer) DO UPDATE SET pending = excluded.pending, "
                            "failed = excluded.failed, oldest_age_s = excluded.oldest_age_s, updated_at = now()",
                  4, p, NULL);
}

/* One claimed row, on its way. */
struct outbound_row {
    const char *row_id, *command_id, *type, *body;
    const struct cfg_queue *q; /* its queue; NULL: failed (why) */
    char why[256];
    bool refused;              /* its bounded queue was full: it stays pending */
};

/* Checks row o as a worker would (envelope_parse) and finds its queue; sets
 * o->why when it cannot be sent. */
static void forward_route(const struct cfg *cfg, struct outbound_row *o) {
    struct envelope env;
    char err[200];
    if (envelope_parse(o->body, strlen(o->body), (size_t)cfg->max_message_bytes, NULL, &env, err, sizeof err) < 0) {
        snprintf(o->why, sizeof o->why, "not a valid command: %s", err);
        return;
    }
    if (env.field_errors || env.has_nul) snprintf(o->why, sizeof o->why, "not a valid command: %s",
                                                  env.has_nul ? "a string holds \\u0000" : "a field is invalid");
    else if (!(o->q = cfg_queue_for(cfg, o->type)))
        snprintf(o->why, sizeof o->why, "no queue in %s routes command type '%s'", cfg->path, o->type);
    envelope_free(&env);
}

/* Publishes the rows of transport t among rows[0..n) with one wait for the
 * broker (opened and, for RabbitMQ, declared on first use into brokers[t]).
 * Returns 0 (rows with refused set were refused by a full queue) or an error
 * class (the broker is closed; reopened next time). */
static int forward_publish(const struct cfg *cfg, struct broker **brokers, enum transport t,
                           struct outbound_row *rows, int n) {
    struct outgoing_command *oc = calloc((size_t)n, sizeof *oc);
    int k = 0;
    if (!oc) return CV_ERETRY;
    for (int i = 0; i < n; i++)
        if (rows[i].q && rows[i].q->transport == t)
            oc[k++] = (struct outgoing_command){rows[i].q, rows[i].type, rows[i].body, strlen(rows[i].body),
                                                rows[i].command_id, &rows[i].refused};
    int rc = 0;
    if (k > 0) {
        char err[512];
        int cls = CV_ERETRY;
        if (!brokers[t] && (brokers[t] = broker_open_class(cfg, t, &cls, err, sizeof err)) &&
            t == TRANSPORT_RABBITMQ && (rc = broker_declare(brokers[t])) < 0)
            log_warn("producer %s: cannot declare RabbitMQ's topology: %s", producer->name, broker_error(brokers[t]));
        if (!brokers[t]) {
            log_warn("producer %s: broker unreachable: %s", producer->name, err);
            rc = cls;
        } else if (rc == 0) {
            rc = broker_publish_commands(brokers[t], oc, k);
            if (rc < 0 && rc != CV_EFULL)
                log_warn("producer %s: publishing commands failed: %s", producer->name, broker_error(brokers[t]));
        }
        if (rc < 0 && rc != CV_EFULL) {
            broker_close(brokers[t]);
            brokers[t] = NULL;
        }
    }
    free(oc);
    return rc == CV_EFULL ? 0 : rc;
}

/* Claims up to batch pending rows above the floor in id order, publishes
 * them, marks them forwarded (or failed, with the reason), and moves the
 * floor when every claimed row was marked. Returns the number claimed, or an
 * error class (nothing marked: the rows are claimed again). *refused tells
 * whether a full queue refused some (they stay pending). */
static int forward_drain(const struct cfg *cfg, struct db *db, struct broker **brokers, struct claim_floor *f,
                         bool *refused) {
    char limit[16], after[24];
    snprintf(limit, sizeof limit, "%d", cfg->relay_batch);
    snprintf(after, sizeof after, "%lld", (long long)f->floor);
    const char *p[2] = {after, limit};
    PGresult *r;
    /* the envelope is built by the database: the command as the producer enqueued it */
    int rc = db_exec(db, "SELECT coalesce(pg_sequence_last_value('conveyor.outbound_id_seq'::regclass), 0), "
                         "pg_snapshot_xmin(pg_current_snapshot())::text, o.id, o.command_id::text, o.type, "
                         "(jsonb_build_object('id', o.command_id, 'type', o.type, 'payload', o.payload, 'createdAt', "
                         "to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')) "
                         "|| CASE WHEN o.correlation_id IS NULL THEN '{}'::jsonb "
                         "ELSE jsonb_build_object('correlationId', o.correlation_id) END "
                         "|| CASE WHEN o.not_before IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('notBefore', "
                         "to_char(o.not_before AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')) END)::text "
                         "FROM (SELECT 1) one LEFT JOIN LATERAL ("
                         "SELECT * FROM conveyor.outbound WHERE state = 'pending' AND id > $1::bigint "
                         "ORDER BY id LIMIT $2::int) o ON true ORDER BY o.id",
                     2, p, &r);
    if (rc < 0) return rc;
    struct claim_horizon h = {strtoll(PQgetvalue(r, 0, 0), NULL, 10), strtoull(PQgetvalue(r, 0, 1), NULL, 10)};
    int n = PQgetisnull(r, 0, 2) ? 0 : PQntuples(r);
    if (n == 0) {
        PQclear(r);
        claim_floor_advance(f, h, 0, cfg->relay_batch, 0, 0);
        return 0;
    }
    struct outbound_row *rows = calloc((size_t)n, sizeof *rows);
    const char **done = calloc((size_t)n, sizeof *done), **failed = calloc((size_t)n, sizeof *failed),
               **whys = calloc((size_t)n, sizeof *whys);
    if (!rows || !done || !failed || !whys) {
        rc = CV_ERETRY;
        goto out;
    }
    for (int i = 0; i < n; i++) {
        rows[i] = (struct outbound_row){PQgetvalue(r, i, 2), PQgetvalue(r, i, 3), PQgetvalue(r, i, 4),
                                        PQgetvalue(r, i, 5), NULL, "", false};
        forward_route(cfg, &rows[i]);
    }
    for (int t = 0; t < 2 && rc == 0; t++) rc = forward_publish(cfg, brokers, (enum transport)t, rows, n);
    if (rc < 0) goto out;
    int nd = 0, nf = 0;
    *refused = false;
    for (int i = 0; i < n; i++) {
        if (rows[i].q && !rows[i].refused) done[nd++] = rows[i].row_id;
        else if (!rows[i].q) {
            failed[nf] = rows[i].row_id;
            whys[nf++] = rows[i].why;
            log_warn("producer %s: outbound row %s (command %s) kept as failed: %s", producer->name, rows[i].row_id,
                     rows[i].command_id, rows[i].why);
        } else *refused = true;
    }
    char *ids = db_array(done, nd), *fids = db_array(failed, nf), *fwhy = db_array(whys, nf);
    const char *mp[3] = {ids, fids, fwhy};
    PGresult *m = NULL;
    rc = db_exec(db, "WITH f AS (UPDATE conveyor.outbound o SET state = 'failed', error = w.why "
                         "FROM unnest($2::bigint[], $3::text[]) AS w(id, why) WHERE o.id = w.id), "
                         "d AS (UPDATE conveyor.outbound SET state = 'forwarded', forwarded_at = now() "
                         "WHERE id = ANY($1::bigint[])) SELECT pg_current_xact_id()::text",
                     3, mp, &m);
    free(ids);
    free(fids);
    free(fwhy);
    if (rc == 0) {
        /* the floor moves only past rows all marked: a refused one stays below it otherwise */
        if (!*refused)
            claim_floor_advance(f, h, n, cfg->relay_batch, strtoll(rows[n - 1].row_id, NULL, 10),
                                strtoull(PQgetvalue(m, 0, 0), NULL, 10));
        PQclear(m);
        rc = n;
    }
out:
    free(rows);
    free(done);
    free(failed);
    free(whys);
    PQclear(r);
    return rc;
}

/* Deletes forwarded rows older than relay.retention_seconds. */
static void forward_prune(const struct cfg *cfg, struct db *db) {
    char secs[24];
    snprintf(secs, sizeof secs, "%ld", cfg->outbox_retention_s);
    const char *p[1] = {secs};
    PGresult *r;
    if (db_exec(db, "DELETE FROM conveyor.outbound WHERE state = 'forwarded' "
                    "AND forwarded_at < now() - make_interval(secs => $1::bigint)", 1, p, &r) == 0) {
        if (strcmp(PQcmdTuples(r), "0") != 0) log_info("producer %s: pruned %s forwarded rows", producer->name,
                                                       PQcmdTuples(r));
        PQclear(r);
    }
}

/* Waits up to ms for a NOTIFY of conveyor.enqueue, and consumes what came. */
static void forward_wait(struct db *db, int ms) {
    PGconn *conn = db_conn(db);
    struct pollfd pfd = {PQsocket(conn), POLLIN, 0};
    PQconsumeInput(conn);
    PGnotify *n = PQnotifies(conn);
    if (n || poll(&pfd, 1, ms) > 0) {
        PQfreemem(n);
        PQconsumeInput(conn);
        for (PGnotify *m; (m = PQnotifies(conn)); PQfreemem(m)) {}
    }
}

/* How long the active forwarder may fail to publish before it gives up the
 * lock (another pool's may reach the broker): as the relay's. */
static int give_up_ms(const struct cfg *cfg) { return 2 * cfg->broker_reply_timeout_ms; }

/* Holds the forwarder lock in the producer database db and forwards until
 * stop, a lost connection, a deadline without publishing, or a schema that is
 * not installed (it then stands by, saying so, and looks again). */
static enum singleton_end forward_active(const struct cfg *cfg, struct db *db) {
    if (producer_types_sync(db, cfg) < 0) {
        log_error("producer %s: its database has no Conveyor schema (%s): run conveyor-admin producer install "
                  "--database URL; looking again in 10 s", producer->name, db_errstr(db));
        return SINGLETON_GAVE_UP;
    }
    if (db_cmd(db, "LISTEN conveyor_outbound") < 0 || db_cmd(db, "SET synchronous_commit TO off") < 0 ||
        db_cmd(db, "SET enable_seqscan TO off") < 0 || db_cmd(db, "SET jit TO off") < 0)
        return SINGLETON_LOST; /* as the relay: marks may be lost in a crash (sent again, applied once) */
    struct broker *brokers[2] = {NULL, NULL};
    struct claim_floor floor = {0};
    int failures = 0;
    int64_t failing_since = 0, next_prune = clock_mono_ms();
    long forwarded = 0;
    enum singleton_end end = SINGLETON_LOST;
    while (!stop_requested && db_ok(db)) {
        forward_report(cfg, db);
        bool refused = false;
        int n = forward_drain(cfg, db, brokers, &floor, &refused);
        if (n < 0) {
            if (!failing_since) failing_since = clock_mono_ms();
            if (clock_mono_ms() - failing_since >= give_up_ms(cfg) && db_ok(db)) {
                log_warn("producer %s: the forwarder could not publish for %lld ms: giving up its lock, so that "
                         "another pool's forwarder takes over; standing by", producer->name,
                         (long long)(clock_mono_ms() - failing_since));
                end = SINGLETON_GAVE_UP;
                break;
            }
            backoff_sleep(backoff_ms(failures++, 100, 5000), &stop_requested);
            continue;
        }
        if (failures) log_info("producer %s: forwarding again", producer->name);
        failures = 0;
        failing_since = 0;
        forwarded += n;
        if (refused) { /* a full queue: its rows wait, as its bound asks */
            backoff_sleep(FULL_RETRY_MS, &stop_requested);
            continue;
        }
        if (n == cfg->relay_batch) continue;
        if (clock_mono_ms() >= next_prune) {
            forward_prune(cfg, db);
            next_prune = clock_mono_ms() + PRUNE_EVERY_MS;
        }
        forward_wait(db, cfg->relay_poll_ms < REPORT_EVERY_MS ? cfg->relay_poll_ms : REPORT_EVERY_MS);
    }
    log_info("producer %s: forwarder no longer active after %ld rows", producer->name, forwarded);
    broker_close(brokers[0]);
    broker_close(brokers[1]);
    return end;
}

static int forward_gave_up_wait_ms(const struct cfg *cfg) { return give_up_ms(cfg) < 10000 ? 10000 : give_up_ms(cfg); }

static const struct singleton forward_singleton = {
    .name = "forward",
    .doing = "forwarding a producer's outbox",
    .active = forward_active,
    .standing_by = forward_report,
    .stopping = NULL,
    .gave_up_wait_ms = forward_gave_up_wait_ms,
};

int forwarder_run(const struct cfg *cfg, int index) {
    producer = &cfg->producers[index];
    char lock[CFG_NAME_MAX + 16];
    snprintf(lock, sizeof lock, "%s.forward", cfg->prefix);
    int rc = singleton_run_at(cfg, &forward_singleton, producer->url, lock);
    db_close(state_db);
    state_db = NULL;
    return rc;
}
