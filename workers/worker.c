/* worker.c - one worker process: take a message, run its command in one
 * transaction with the dedup row and the outbox rows, commit, then ack.
 *
 *   BEGIN
 *     INSERT processed_commands(id)  -- conflict: duplicate, ROLLBACK, ack
 *     SAVEPOINT command
 *     handler                        -- rejected: ROLLBACK TO SAVEPOINT, command.rejected
 *     INSERT outbox(events)
 *   NOTIFY; COMMIT
 *   ack
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

volatile int stop_requested;

struct worker {
    const struct cfg *cfg;
    const struct cfg_queue *q;
    const char *id;
    PGconn *db;
    struct broker *broker;
    char commit_sql[160];  /* NOTIFY "<prefix>_outbox"; COMMIT */
    int failures;          /* consecutive transient failures, for backoff */
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
    if ((rc = db_cmd(db, "BEGIN")) < 0) return rc;
    if ((rc = db_exec(db, "INSERT INTO processed_commands (id, type, outcome) VALUES ($1, $2, 'applied') "
                          "ON CONFLICT (id) DO NOTHING", 2, p, &r, NULL)) < 0)
        goto rollback;
    bool duplicate = strcmp(PQcmdTuples(r), "0") == 0;
    PQclear(r);
    if (duplicate) {
        db_cmd(db, "ROLLBACK");
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

/* Retries a broker operation on the current message until it lands or we stop. */
static void settle_dead(struct worker *w, const struct delivery *d, const char *reason, const char *error,
                        const char *command_id) {
    log_msg(LOG_WARN, command_id, "dead-lettered (%s): %s", reason, error);
    for (int attempt = 0; !stop_requested; attempt++) {
        int rc = broker_dead_letter(w->broker, d, reason, error, 0);
        if (rc == 0) return;
        log_warn("cannot dead-letter yet: %s", broker_error(w->broker));
        if (rc != CV_ERETRY) return; /* unacked: RabbitMQ redelivers; Redis keeps it in flight */
        backoff_sleep(backoff_ms(attempt, 100, 5000), &stop_requested);
    }
}

static void process(struct worker *w, struct delivery *d) {
    struct envelope env;
    char err[256];
    if (envelope_parse(d->body, d->len, (size_t)w->cfg->max_message_bytes, d->message_id, &env, err,
                       sizeof err) < 0) {
        settle_dead(w, d, "invalid_envelope", err, NULL);
        return;
    }
    handler_fn handler = handler_find(env.type);
    if (!handler) {
        snprintf(err, sizeof err, "no handler for command type '%s'", env.type);
        settle_dead(w, d, "unknown_command", err, env.id);
        envelope_free(&env);
        return;
    }
    for (;;) {
        if (!w->db && !(w->db = db_connect_retry(w->cfg->database_url, &stop_requested))) break;
        int rc = run_transaction(w, &env, handler);
        db_check(w);
        if (rc >= 0) {
            w->failures = 0;
            log_msg(LOG_DEBUG, env.id, "%s %s", env.type, outcome_name[rc]);
            if (broker_ack(w->broker, d) < 0)
                log_msg(LOG_WARN, env.id, "ack failed (%s); the message will come back and be found done",
                        broker_error(w->broker));
            envelope_free(&env);
            return;
        }
        /* transient (or an unexpected database error): back off and try again */
        int delay = backoff_ms(w->failures++, 50, 5000);
        log_msg(LOG_WARN, env.id, "%s failed (%s); retrying in %d ms", env.type, cv_strerror(rc), delay);
        backoff_sleep(delay, &stop_requested);
        if (stop_requested) break;
    }
    /* stopping with the command not done: give it back */
    if (broker_requeue(w->broker, d) < 0)
        log_msg(LOG_WARN, env.id, "requeue failed (%s); the broker returns it on disconnect",
                broker_error(w->broker));
    envelope_free(&env);
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
    w.db = db_connect_retry(cfg->database_url, &stop_requested);
    log_info("worker %s consuming queue %s (%s)", worker_id, q->name, transport_name(q->transport));

    int broker_failures = 0;
    while (!stop_requested) {
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
    }
    log_info("worker %s stopped", worker_id);
    broker_close(w.broker);
    PQfinish(w.db);
    return 0;
}
