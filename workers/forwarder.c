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
#define FULL_RETRY_MS 1000 /* a full queue's rows are left out of claims this long after a refusal */

#define REPORT_PAUSE_MS 10000 /* after a failed report, the next is tried this much later */

static const struct cfg_producer *producer; /* this process's producer (forwarder_run) */
static struct db *state_db;                 /* Conveyor's database, for forward_state; opened on use */
static int64_t next_report_ms;
static bool said_no_schema;                 /* "not installed" was logged (once until it is) */
static int publish_failures;                /* broker failures in a row (the first is logged) */

/* Whether the producer database has the outbox (schema conveyor installed);
 * says so once when it has not. Returns 1, 0, or an error class. */
static int outbox_installed(struct db *db) {
    PGresult *r;
    int rc = db_exec(db, "SELECT to_regclass('conveyor.outbound') IS NOT NULL", 0, NULL, &r);
    if (rc < 0) return rc;
    bool yes = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    if (!yes && !said_no_schema)
        log_error("producer %s: its database has no Conveyor outbox (schema conveyor): run conveyor-admin producer "
                  "install %s (or --database URL); looking again every 10 s", producer->name, producer->name);
    said_no_schema = !yes;
    return yes;
}

/* Counts what waits in the producer database (db) and writes it to
 * forward_state in Conveyor's database, at most once a second. A failure
 * (either database) pauses the reports for REPORT_PAUSE_MS: the counts are a
 * view, and must not hold up forwarding. */
static void forward_report(const struct cfg *cfg, struct db *db) {
    if (clock_mono_ms() < next_report_ms) return;
    next_report_ms = clock_mono_ms() + REPORT_PAUSE_MS; /* until it succeeds */
    if (outbox_installed(db) != 1) return;
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
    if (db_exec(state_db, "INSERT INTO forward_state (producer, pending, failed, oldest_age_s, updated_at) "
                            "VALUES ($1, $2::bigint, $3::bigint, $4::double precision, now()) "
                            "ON CONFLICT (producer) DO UPDATE SET pending = excluded.pending, "
                            "failed = excluded.failed, oldest_age_s = excluded.oldest_age_s, updated_at = now()",
                  4, p, NULL) == 0)
        next_report_ms = clock_mono_ms() + REPORT_EVERY_MS;
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
    utf8_cut(o->why); /* a snprintf cut may have split a character: the mark must be valid text */
}

/* Publishes the rows of transport t among rows[0..n) with one wait for the
 * broker (opened and, for RabbitMQ, declared on first use into brokers[t]).
 * Returns 0 (rows with refused set were refused by a full queue) or an error
 * class (the broker is closed; reopened next time; CV_ECONFIG: the broker
 * refused the configuration; CV_EREFUSED: it refused a message), logged on
 * the first failure of a row of them. */
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
        bool say = publish_failures == 0;
        if (!brokers[t] && (brokers[t] = broker_open_class(cfg, t, &cls, err, sizeof err)) &&
            t == TRANSPORT_RABBITMQ && (rc = broker_declare(brokers[t])) < 0 && say)
            log_warn("producer %s: cannot declare RabbitMQ's topology: %s", producer->name, broker_error(brokers[t]));
        if (!brokers[t]) {
            if (say || cls == CV_ECONFIG) log_warn("producer %s: broker unreachable: %s", producer->name, err);
            rc = cls;
        } else if (rc == 0) {
            rc = broker_publish_commands(brokers[t], oc, k);
            if (rc < 0 && rc != CV_EFULL && say)
                log_warn("producer %s: publishing commands failed: %s", producer->name, broker_error(brokers[t]));
        }
        if (rc == CV_EREFUSED && k == 1 && brokers[t]) { /* this one message is refused: kept as failed */
            for (int i = 0; i < n; i++)
                if (rows[i].q && rows[i].q->transport == t) {
                    snprintf(rows[i].why, sizeof rows[i].why, "the broker refused it: %s", broker_error(brokers[t]));
                    utf8_cut(rows[i].why);
                    rows[i].q = NULL;
                }
            rc = 0;
        }
        if (rc < 0 && rc != CV_EFULL) {
            broker_close(brokers[t]);
            brokers[t] = NULL;
        }
    }
    free(oc);
    return rc == CV_EFULL ? 0 : rc;
}

/* The active forwarder's state. */
struct forwarding {
    struct broker *brokers[2];   /* by transport, opened on use */
    struct claim_floor floor;
    int64_t *full_until;         /* by cfg queue: a full queue's rows are left out of claims until then */
    int single_rows;             /* claims of one row left (after a refused message in a batch) */
    long forwarded, failed;      /* rows marked so since it became active */
};

/* The types of the queues found full, whose rows claims leave out for now
 * (so that one full queue holds up only its own commands), as a text[]
 * literal (caller frees); *any: there is one. */
static char *full_types(const struct cfg *cfg, const struct forwarding *fw, bool *any) {
    const char **types = xcalloc((size_t)64 + 1, sizeof *types);
    int n = 0, cap = 64;
    int64_t now = clock_mono_ms();
    for (int i = 0; i < cfg->nqueues; i++)
        for (int j = 0; fw->full_until[i] > now && j < cfg->queues[i].ncommands; j++) {
            if (n == cap) types = xrealloc(types, (size_t)(cap *= 2) * sizeof *types);
            types[n++] = cfg->queues[i].commands[j];
        }
    *any = n > 0;
    char *arr = db_array(types, n);
    free(types);
    return arr;
}

/* Claims up to relay.batch_size pending rows above the floor in id order
 * (leaving out the types of full queues for now), publishes them, marks them
 * forwarded (or failed, with the reason), and moves the floor when every
 * claimed row was marked and none was left out. Returns the number claimed,
 * or an error class (nothing marked: the rows are claimed again). */
static int forward_drain(const struct cfg *cfg, struct db *db, struct forwarding *fw) {
    char limit[16], after[24];
    snprintf(limit, sizeof limit, "%d", fw->single_rows > 0 ? 1 : cfg->relay_batch);
    snprintf(after, sizeof after, "%lld", (long long)fw->floor.floor);
    bool skipping;
    char *skip = full_types(cfg, fw, &skipping);
    const char *p[3] = {after, limit, skip};
    PGresult *r;
    /* the envelope is built by the database: the command as the producer enqueued it */
    int rc = db_exec(db, "SELECT coalesce(pg_sequence_last_value('conveyor.outbound_id_seq'::regclass), 0), "
                         "pg_snapshot_xmin(pg_current_snapshot())::text, o.id, o.command_id::text, o.type, "
                         "conveyor.envelope(o)::text "
                         "FROM (SELECT 1) one LEFT JOIN LATERAL ("
                         "SELECT * FROM conveyor.outbound WHERE state = 'pending' AND id > $1::bigint "
                         "AND type <> ALL($3::text[]) ORDER BY id LIMIT $2::int) o ON true ORDER BY o.id",
                     3, p, &r);
    free(skip);
    if (rc < 0) return rc;
    struct claim_horizon h = {strtoll(PQgetvalue(r, 0, 0), NULL, 10), strtoull(PQgetvalue(r, 0, 1), NULL, 10)};
    int n = PQgetisnull(r, 0, 2) ? 0 : PQntuples(r);
    if (n == 0) {
        PQclear(r);
        if (!skipping) claim_floor_advance(&fw->floor, h, 0, cfg->relay_batch, 0, 0);
        return 0;
    }
    struct outbound_row *rows = xcalloc((size_t)n, sizeof *rows);
    const char **done = xcalloc((size_t)n, sizeof *done), **failed = xcalloc((size_t)n, sizeof *failed),
               **whys = xcalloc((size_t)n, sizeof *whys);
    for (int i = 0; i < n; i++) {
        rows[i] = (struct outbound_row){PQgetvalue(r, i, 2), PQgetvalue(r, i, 3), PQgetvalue(r, i, 4),
                                        PQgetvalue(r, i, 5), NULL, "", false};
        forward_route(cfg, &rows[i]);
    }
    for (int t = 0; t < 2 && rc == 0; t++) rc = forward_publish(cfg, fw->brokers, (enum transport)t, rows, n);
    if (rc == CV_EREFUSED && n > 1) fw->single_rows = cfg->relay_batch; /* find the one refused, row by row */
    if (rc < 0) goto out;
    if (fw->single_rows > 0) fw->single_rows--;
    publish_failures = 0;
    int nd = 0, nf = 0, first_failed = -1;
    bool refused = false;
    for (int i = 0; i < n; i++) {
        if (rows[i].q && !rows[i].refused) {
            done[nd++] = rows[i].row_id;
        } else if (!rows[i].q) {
            if (first_failed < 0) first_failed = i;
            failed[nf] = rows[i].row_id;
            whys[nf++] = rows[i].why;
        } else {
            refused = true;
            fw->full_until[rows[i].q - cfg->queues] = clock_mono_ms() + FULL_RETRY_MS;
        }
    }
    if (nf) log_warn("producer %s: %d outbound row%s kept as failed (conveyor-admin producer status), the first "
                     "(command %s): %s", producer->name, nf, nf == 1 ? "" : "s", rows[first_failed].command_id, whys[0]);
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
        /* the floor moves only past rows all marked: a refused or left-out one stays above it */
        if (!refused && !skipping)
            claim_floor_advance(&fw->floor, h, n, fw->single_rows > 0 ? 1 : cfg->relay_batch,
                                strtoll(rows[n - 1].row_id, NULL, 10), strtoull(PQgetvalue(m, 0, 0), NULL, 10));
        PQclear(m);
        fw->forwarded += nd;
        fw->failed += nf;
        rc = refused ? CV_EFULL : n;
    }
out:
    if (rc < 0 && rc != CV_EFULL) publish_failures++;
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
 * stop, a lost connection, a deadline without publishing, a broker that
 * refuses the configuration, or an outbox that is not installed (it then
 * stands by, having said so, and looks again in 10 s). */
static enum singleton_end forward_active(const struct cfg *cfg, struct db *db) {
    int installed = outbox_installed(db);
    if (installed != 1) return installed < 0 ? SINGLETON_LOST : SINGLETON_GAVE_UP;
    if (producer_types_sync(db, cfg, false) < 0 || db_cmd(db, "LISTEN conveyor_outbound") < 0 ||
        db_cmd(db, "SET synchronous_commit TO off") < 0 || db_cmd(db, "SET enable_seqscan TO off") < 0 ||
        db_cmd(db, "SET jit TO off") < 0)
        return SINGLETON_LOST; /* as the relay: marks may be lost in a crash (sent again, applied once) */
    struct forwarding fw = {.full_until = xcalloc((size_t)cfg->nqueues + 1, sizeof *fw.full_until)};
    int failures = 0;
    int64_t failing_since = 0, next_prune = clock_mono_ms();
    enum singleton_end end = SINGLETON_LOST;
    while (!stop_requested && db_ok(db)) {
        forward_report(cfg, db);
        int n = forward_drain(cfg, db, &fw);
        if (n == CV_ECONFIG) {
            log_error("producer %s: the broker refused the configuration; the forwarder stops", producer->name);
            end = SINGLETON_CONFIG_REFUSED;
            break;
        }
        if (n < 0 && n != CV_EFULL) {
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
        if (n == cfg->relay_batch || (n > 0 && fw.single_rows > 0)) continue;
        if (clock_mono_ms() >= next_prune) {
            forward_prune(cfg, db);
            next_prune = clock_mono_ms() + PRUNE_EVERY_MS;
        }
        /* a full queue: its rows are tried again within FULL_RETRY_MS, the others go on */
        forward_wait(db, n == CV_EFULL ? FULL_RETRY_MS / 4
                         : cfg->relay_poll_ms < REPORT_EVERY_MS ? cfg->relay_poll_ms : REPORT_EVERY_MS);
    }
    log_info("producer %s: forwarder no longer active: %ld rows forwarded, %ld kept as failed", producer->name,
             fw.forwarded, fw.failed);
    broker_close(fw.brokers[0]);
    broker_close(fw.brokers[1]);
    free(fw.full_until);
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
    static char component[CFG_NAME_MAX + 16]; /* log lines name the producer */
    snprintf(component, sizeof component, "forward-%s", producer->name);
    log_init(component);
    char shown[512];
    url_redact(producer->url, shown, sizeof shown);
    log_info("forwarder of producer %s (%s)", producer->name, shown);
    /* not the prefix's: one producer database has one outbox, whatever deployment forwards it */
    int rc = singleton_run_at(cfg, &forward_singleton, producer->url, "conveyor.forward");
    db_close(state_db);
    state_db = NULL;
    return rc;
}
