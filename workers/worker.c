/* worker.c - one worker process: take a message, run its command in one
 * transaction with the dedup row and the outbox rows, commit, then ack.
 *
 *   attempts += 1 (command_attempts, committed before the handler starts)
 *   BEGIN
 *     INSERT processed_commands(id)  -- conflict: duplicate, ROLLBACK, ack
 *     DELETE command_attempts(id)
 *     SAVEPOINT command
 *     handler                        -- rejected: ROLLBACK TO SAVEPOINT, command.rejected
 *     INSERT outbox(events)
 *   NOTIFY; COMMIT
 *   ack
 *
 * A failure of the transaction (connection lost, serialization failure,
 * deadlock, timeout, or an unexpected database error) sends the message to the
 * broker's delay (retry) with exponential backoff; after max_attempts handler
 * starts it is dead-lettered (retries_exhausted). The worker never waits with a
 * message in hand.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

volatile int stop_requested;

struct worker {
    const struct cfg *cfg;
    const struct cfg_queue *q;
    const char *id;
    PGconn *db;
    struct broker *broker;
    char commit_sql[160];  /* NOTIFY "<prefix>_outbox"; COMMIT */
    long jobs;             /* commands handled, for max_jobs */
};

enum outcome { APPLIED, REJECTED, DUPLICATE };

static const char *outcome_name[] = {"applied", "rejected", "duplicate"};

/* Drops a broken database connection so the next command reconnects. */
static void db_check(struct worker *w) {
    if (w->db && PQstatus(w->db) != CONNECTION_OK) {
        log_warn("database connection lost; reconnecting");
        PQfinish(w->db);
        w->db = NULL;
    }
}

/* command.rejected data: {code, message, fields?, details?}. Takes rej's JSON. */
static cJSON *rejection_data(struct rejection *rej) {
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "code", rej->code);
    cJSON_AddStringToObject(d, "message", rej->message);
    if (rej->fields) cJSON_AddItemToObject(d, "fields", rej->fields);
    if (rej->details) cJSON_AddItemToObject(d, "details", rej->details);
    rej->fields = rej->details = NULL;
    return d;
}

/* Envelope-level rules that make a command rejected rather than dead. */
static int check_envelope_rules(struct cmd_ctx *ctx) {
    if (ctx->cmd->has_nul) {
        cJSON *f = cJSON_CreateObject();
        cJSON_AddStringToObject(f, "payload", "strings must not contain NUL characters (\\u0000)");
        return ctx_reject(ctx, "VALIDATION_FAILED", f, NULL, "a string holds a NUL character");
    }
    if (ctx->cmd->field_errors)
        return ctx_reject(ctx, "VALIDATION_FAILED", cJSON_Duplicate(ctx->cmd->field_errors, 1), NULL,
                          "the envelope breaks a rule");
    return 0;
}

/* Runs the command in one transaction. Returns an outcome (>= 0) or the
 * error class of a failure (the transaction is then rolled back). */
static int run_transaction(struct worker *w, const struct envelope *env, handler_fn handler) {
    PGconn *db = w->db;
    const char *p[2] = {env->id, env->type};
    PGresult *r;
    int rc;
    /* the session commits asynchronously (attempt counts); commands commit as the server is configured */
    if ((rc = db_cmd(db, "BEGIN; SET LOCAL synchronous_commit TO DEFAULT")) < 0) return rc;
    if ((rc = db_exec(db, "WITH done AS (DELETE FROM command_attempts WHERE id = $1) "
                          "INSERT INTO processed_commands (id, type, outcome) VALUES ($1, $2, 'applied') "
                          "ON CONFLICT (id) DO NOTHING", 2, p, &r, NULL)) < 0)
        goto rollback;
    bool duplicate = strcmp(PQcmdTuples(r), "0") == 0;
    PQclear(r);
    if (duplicate) {
        db_cmd(db, "ROLLBACK");
        db_exec(db, "DELETE FROM command_attempts WHERE id = $1", 1, p, NULL, NULL);
        return DUPLICATE;
    }
    if ((rc = db_cmd(db, "SAVEPOINT command")) < 0) goto rollback;

    struct cmd_ctx ctx = {.db = db, .cfg = w->cfg, .cmd = env};
    rc = check_envelope_rules(&ctx);
    if (rc == 0) rc = handler(&ctx);
    enum outcome outcome = APPLIED;
    if (rc == CV_EREJECT) {
        outcome = REJECTED;
        cJSON_Delete(ctx.events);
        ctx.events = NULL;
        if ((rc = db_cmd(db, "ROLLBACK TO SAVEPOINT command")) < 0) goto rollback_ctx;
        log_msg(LOG_DEBUG, env->id, "%s rejected: %s (%s)", env->type, ctx.rej.code, ctx.rej.message);
        ctx_emit(&ctx, "command.rejected", "command", env->id, rejection_data(&ctx.rej));
        if ((rc = db_exec(db, "UPDATE processed_commands SET outcome = 'rejected' WHERE id = $1", 1, p, NULL,
                          NULL)) < 0)
            goto rollback_ctx;
    } else if (rc < 0) {
        goto rollback_ctx;
    }

    char *events = cJSON_PrintUnformatted(ctx.events);
    const char *ep[1] = {events};
    rc = db_exec(db,
                 "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) "
                 "SELECT (e->>'id')::uuid, e->>'aggregateType', (e->>'aggregateId')::uuid, e->>'type', e "
                 "FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t(e, n) ORDER BY n",
                 1, ep, NULL, NULL);
    free(events);
    if (rc < 0) goto rollback_ctx;
    if ((rc = db_cmd(db, w->commit_sql)) < 0) goto rollback_ctx;
    cJSON_Delete(ctx.events);
    cJSON_Delete(ctx.rej.fields);
    cJSON_Delete(ctx.rej.details);
    return outcome;

rollback_ctx:
    cJSON_Delete(ctx.events);
    cJSON_Delete(ctx.rej.fields);
    cJSON_Delete(ctx.rej.details);
rollback:
    if (PQstatus(db) == CONNECTION_OK) PQclear(PQexec(db, "ROLLBACK"));
    return rc;
}

/* Moves the message to the dead letters, retrying while the broker is away. */
static void settle_dead(struct worker *w, const struct delivery *d, const char *reason, const char *error,
                        int attempts, const char *command_id) {
    log_msg(LOG_WARN, command_id, "dead-lettered (%s): %s", reason, error);
    for (int attempt = 0; !stop_requested; attempt++) {
        int rc = broker_dead_letter(w->broker, d, reason, error, attempts);
        if (rc == 0) return;
        log_warn("cannot dead-letter yet: %s", broker_error(w->broker));
        if (rc != CV_ERETRY) return; /* unacked: RabbitMQ redelivers; Redis keeps it in flight */
        backoff_sleep(backoff_ms(attempt, 100, 5000), &stop_requested);
    }
}

/* Counts one more start of the handler on command id, durably, before it
 * runs. Returns the count (>= 1), or an error class when the database is
 * unreachable. *last_error gets the error of the previous attempt (caller frees). */
static int attempt_start(struct worker *w, const char *id, char **last_error) {
    const char *p[1] = {id};
    PGresult *r;
    *last_error = NULL;
    int rc = db_exec(w->db, "INSERT INTO command_attempts (id, attempts) VALUES ($1, 1) "
                            "ON CONFLICT (id) DO UPDATE SET attempts = command_attempts.attempts + 1, "
                            "updated_at = now() RETURNING attempts, last_error", 1, p, &r, NULL);
    if (rc < 0) return rc;
    int n = atoi(PQgetvalue(r, 0, 0));
    if (!PQgetisnull(r, 0, 1)) *last_error = strdup(PQgetvalue(r, 0, 1));
    PQclear(r);
    return n;
}

/* After a failed attempt: records why, then retries later or gives up. */
static void attempt_failed(struct worker *w, const struct delivery *d, const struct envelope *env, int attempts,
                           int rc) {
    char error[600];
    snprintf(error, sizeof error, "%s: %s", cv_strerror(rc), db_last_error());
    db_check(w);
    if (w->db) {
        const char *p[2] = {env->id, error};
        db_exec(w->db, "UPDATE command_attempts SET last_error = $2 WHERE id = $1", 2, p, NULL, NULL);
    }
    if (attempts >= w->q->max_attempts) {
        settle_dead(w, d, "retries_exhausted", error, attempts, env->id);
        return;
    }
    int delay = backoff_ms(attempts - 1, w->cfg->retry_base_ms, w->cfg->retry_max_ms);
    log_msg(LOG_WARN, env->id, "%s attempt %d of %d failed (%s); retrying in %d ms", env->type, attempts,
            w->q->max_attempts, error, delay);
    for (int i = 0; !stop_requested; i++) {
        int brc = broker_retry(w->broker, d, delay);
        if (brc == 0) return;
        log_warn("cannot schedule the retry yet: %s", broker_error(w->broker));
        if (brc != CV_ERETRY) break;
        backoff_sleep(backoff_ms(i, 100, 5000), &stop_requested);
    }
    /* could not park it: hand it back now */
    if (broker_requeue(w->broker, d) < 0)
        log_msg(LOG_WARN, env->id, "requeue failed too (%s); the broker returns it when the connection closes",
                broker_error(w->broker));
}

static void process(struct worker *w, struct delivery *d) {
    struct envelope env;
    char err[256];
    if (envelope_parse(d->body, d->len, (size_t)w->cfg->max_message_bytes, d->message_id, &env, err,
                       sizeof err) < 0) {
        settle_dead(w, d, "invalid_envelope", err, 0, NULL);
        return;
    }
    /* A type this build has no handler for, or that this queue's `commands` does
     * not list (an older deployment), waits as a dead letter for an upgrade. */
    handler_fn handler = handler_find(env.type);
    if (!handler || cfg_queue_for(w->cfg, env.type) != w->q) {
        if (!handler) snprintf(err, sizeof err, "no handler for command type '%s'", env.type);
        else snprintf(err, sizeof err, "queue '%s' does not take command type '%s' (its commands in the config)",
                      w->q->name, env.type);
        settle_dead(w, d, "unknown_command", err, 0, env.id);
        envelope_free(&env);
        return;
    }
    char *last_error = NULL;
    int attempts = attempt_start(w, env.id, &last_error);
    if (attempts < 0) {
        /* the database is away: not an attempt; give the message back and reconnect */
        db_check(w);
        if (broker_requeue(w->broker, d) < 0)
            log_msg(LOG_WARN, env.id, "requeue failed (%s); the broker returns it when the connection closes",
                    broker_error(w->broker));
        envelope_free(&env);
        return;
    }
    if (attempts > w->q->max_attempts) {
        /* the handler was started max_attempts times (some of them killed their worker) */
        char why[700];
        snprintf(why, sizeof why, "gave up after %d attempts; last error: %s", attempts - 1,
                 last_error ? last_error : "the worker died while handling it");
        settle_dead(w, d, "retries_exhausted", why, attempts - 1, env.id);
    } else {
        int rc = run_transaction(w, &env, handler);
        if (rc >= 0) {
            log_msg(LOG_DEBUG, env.id, "%s %s", env.type, outcome_name[rc]);
            while (broker_ack(w->broker, d) == CV_ERETRY && !stop_requested) {
                /* Redis: the in-flight entry must go, or it would come back after a restart */
                log_msg(LOG_WARN, env.id, "ack failed (%s); retrying", broker_error(w->broker));
                backoff_sleep(500, &stop_requested);
            }
        } else {
            attempt_failed(w, d, &env, attempts, rc);
        }
    }
    free(last_error);
    envelope_free(&env);
}

/* Connects to the database for a worker: attempt counts commit asynchronously
 * (they only have to survive this worker, not the database host). */
static PGconn *worker_db_connect(const struct cfg *cfg) {
    for (;;) {
        PGconn *db = db_connect_retry(cfg->database_url, &stop_requested);
        if (!db || db_cmd(db, "SET synchronous_commit TO off") == 0) return db;
        PQfinish(db);
    }
}

/* True when the worker should exit and be replaced (max_jobs, max_rss_mb). */
static bool should_recycle(struct worker *w) {
    if (w->cfg->max_jobs > 0 && w->jobs >= w->cfg->max_jobs) {
        log_info("recycling after %ld commands (max_jobs)", w->jobs);
        return true;
    }
    if (w->cfg->max_rss_mb > 0) {
        long pages = 0, rss = 0;
        FILE *f = fopen("/proc/self/statm", "r");
        if (f) {
            if (fscanf(f, "%ld %ld", &pages, &rss) != 2) rss = 0;
            fclose(f);
        }
        long mb = rss * (sysconf(_SC_PAGESIZE) / 1024) / 1024;
        if (mb > w->cfg->max_rss_mb) {
            log_info("recycling at %ld MB resident (max_rss_mb %d)", mb, w->cfg->max_rss_mb);
            return true;
        }
    }
    return false;
}

int worker_run(const struct cfg *cfg, const struct cfg_queue *q, const char *worker_id) {
    struct worker w = {.cfg = cfg, .q = q, .id = worker_id};
    snprintf(w.commit_sql, sizeof w.commit_sql, "NOTIFY \"%s_outbox\"; COMMIT", cfg->prefix);
    char err[512];
    for (int attempt = 0; !stop_requested && !w.broker; attempt++) {
        w.broker = broker_open(cfg, q->transport, err, sizeof err);
        if (!w.broker) {
            if (attempt == 0) log_warn("broker unreachable, retrying: %s", err);
            backoff_sleep(backoff_ms(attempt, 100, 5000), &stop_requested);
        }
    }
    if (!w.broker) return 0;
    if (broker_consume(w.broker, q, worker_id) < 0) {
        log_error("cannot consume %s: %s", q->name, broker_error(w.broker));
        broker_close(w.broker);
        return 1;
    }
    log_info("worker %s consuming queue %s (%s)", worker_id, q->name, transport_name(q->transport));

    int broker_failures = 0;
    while (!stop_requested) {
        if (!w.db && !(w.db = worker_db_connect(cfg))) break; /* take nothing while the database is away */
        struct delivery d;
        int rc = broker_next(w.broker, &d, 1000);
        if (rc < 0) {
            if (broker_failures == 0) log_warn("broker lost: %s; reconnecting", broker_error(w.broker));
            backoff_sleep(backoff_ms(broker_failures++, 100, 5000), &stop_requested);
            continue;
        }
        if (broker_failures) log_info("broker is back");
        broker_failures = 0;
        if (rc == 0) continue;
        process(&w, &d);
        delivery_free(&d);
        w.jobs++;
        if (should_recycle(&w)) break;
    }
    log_info("worker %s stopped", worker_id);
    broker_close(w.broker);
    PQfinish(w.db);
    return 0;
}
