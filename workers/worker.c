/* worker.c - one worker process: take messages (up to prefetch of those
 * already delivered or waiting, in one round trip; when there are none, the
 * first waited for), run their commands batch_size per transaction with the
 * dedup rows and the outbox rows, commit, then ack.
 *
 *   redelivered ones only: attempts += 1 (command_attempts, its own transaction,
 *                          before any handler; a first delivery is attempt 1)
 *   BEGIN; INSERT processed_commands(ids)     -- sent with the first command's first
 *                                              -- statement; a conflict: duplicate (the
 *                                              -- first command, run already, is undone)
 *   per command, sorted by productId (lock order):
 *     SAVEPOINT c<i> + the handler's statements -- the savepoint rides with the first
 *                                              -- rejected: ROLLBACK TO SAVEPOINT c<i>, command.rejected
 *                                              -- failed: ROLLBACK TO SAVEPOINT c<i>, retried alone
 *     commands whose handlers run ahead (updateStock, deleteProduct): up to 64
 *     savepoints and first statements in one round trip, then each handler
 *     finishes with its result; one that wants more is rolled back to its
 *     savepoint (with those after it) and runs alone (run_ahead)
 *     (a command alone has no savepoint: its rejection rolls back and redoes
 *      BEGIN + dedup, its failure rolls back the transaction)
 *   INSERT outbox(events of all); settle the dedup rows and attempt counts if any; COMMIT
 *                                              -- one round trip (libpq pipeline, db_defer)
 *   wake the relay: the pool's own through relay_wake.c, else NOTIFY (after COMMIT,
 *                   in the same round trip)
 *   ack (one multiple ack / one pipeline when the whole batch went through)
 *
 * Attempts: a message the broker never delivered before cannot have been
 * started, so its first start is not written down (a transaction saved per
 * batch). If the handler kills its worker, the broker hands the message out
 * again marked redelivered (RabbitMQ's flag, or Redis's returned set), and a
 * redelivered command with no count is taken to have been started once.
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
#include <strings.h>
#include <unistd.h>

volatile int stop_requested;

struct worker {
    const struct cfg *cfg;
    const struct cfg_queue *q;
    const char *id;
    PGconn *db;
    struct broker *broker;
    char notify_sql[160];  /* NOTIFY "<prefix>_outbox" */
    PGresult *claim;       /* the dedup rows a batch inserted (claim_send), until claim_read */
    long jobs;             /* commands handled, for max_jobs */
};

/* One message of a batch, from delivery to settlement. */
struct item {
    struct delivery d;
    struct envelope env;
    const struct handler *handler;
    bool live;            /* parsed, known, within its attempts: it takes part in the transaction */
    int attempts;         /* handler starts, this one included */
    bool counted;         /* its attempts are in command_attempts (it was redelivered) */
    bool claimed;         /* its dedup row is in this transaction: it runs */
    int rc;               /* its outcome (>= 0) or error class */
    cJSON *events;        /* what it emitted, for the batch's outbox insert (owned) */
    PGresult *first;      /* run ahead: its first statement's result, until its handler takes it (owned) */
    bool alone;           /* its statement failed when run ahead: it runs alone (and meets the error once more) */
    char *error;          /* with a failure: the database's error text (owned) */
    const char *key;      /* aggregate it touches first (payload.productId), for lock order; or "" */
};

enum outcome { APPLIED, REJECTED, DUPLICATE };

/* Frees what running it left (error text, events); it can run again. */
static void item_forget_outcome(struct item *it) {
    free(it->error);
    cJSON_Delete(it->events);
    PQclear(it->first);
    it->error = NULL;
    it->events = NULL;
    it->first = NULL;
    it->claimed = false;
    it->rc = 0;
}

static const char *outcome_name[] = {"applied", "rejected", "duplicate"};

/* Drops a broken database connection so the next command reconnects. */
static void db_check(struct worker *w) {
    if (w->db && PQstatus(w->db) != CONNECTION_OK) {
        log_warn("database connection lost; reconnecting");
        db_close(w->db);
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

/* Defers "<verb> c<i>": the savepoint of the batch's i-th command. */
static int defer_savepoint(PGconn *db, const char *verb, int i) {
    char sql[48];
    snprintf(sql, sizeof sql, "%s c%d", verb, i);
    return db_defer(db, sql, 0, NULL);
}

/* Frees what a handler's context holds besides the events it hands over. */
static void ctx_release(struct cmd_ctx *ctx) {
    cJSON_Delete(ctx->events);
    cJSON_Delete(ctx->rej.fields);
    cJSON_Delete(ctx->rej.details);
}

/* Runs one claimed command inside the open transaction: the handler, or its
 * rejection. With a savepoint (sp >= 0: savepoint c<sp>, sent with the
 * handler's first statement), a rejection rolls back to it; without (sp < 0),
 * the caller undoes a rejected command's writes. Its events go to it->events.
 * Returns an outcome (>= 0), or the error class of a failure: the caller then
 * rolls back to the savepoint or the whole transaction. */
static int run_command(struct worker *w, struct item *it, int sp) {
    PGconn *db = w->db;
    const struct envelope *env = &it->env;
    int rc;
    if (sp >= 0 && (rc = defer_savepoint(db, "SAVEPOINT", sp)) < 0) return rc;
    struct cmd_ctx ctx = {.db = db, .cfg = w->cfg, .cmd = env};
    rc = check_envelope_rules(&ctx);
    if (rc == 0) rc = it->handler->run(&ctx);
    enum outcome outcome = APPLIED;
    if (rc == CV_EREJECT) {
        outcome = REJECTED;
        cJSON_Delete(ctx.events);
        ctx.events = NULL;
        /* undo what it wrote; sent with the next statement */
        if (sp >= 0 && (rc = defer_savepoint(db, "ROLLBACK TO SAVEPOINT", sp)) < 0) goto out;
        log_msg(LOG_DEBUG, env->id, "%s rejected: %s (%s)", env->type, ctx.rej.code, ctx.rej.message);
        ctx_emit(&ctx, "command.rejected", "command", env->id, rejection_data(&ctx.rej));
    } else if (rc < 0) {
        goto out;
    }
    it->events = ctx.events;
    ctx.events = NULL;
    rc = outcome;
out:
    ctx_release(&ctx);
    return rc;
}

/* Moves the message to the dead letters, retrying (with capped backoff) while
 * the broker is away or refuses (a dead-letter queue deleted, Redis out of
 * memory): a message is never left half-settled, where a later multiple ack
 * could take it. On stop it stays unacked: RabbitMQ redelivers it, Redis keeps
 * it in flight. */
static void settle_dead(struct worker *w, const struct delivery *d, const char *reason, const char *error,
                        int attempts, const char *command_id) {
    log_msg(LOG_WARN, command_id, "dead-lettered (%s): %s", reason, error);
    for (int attempt = 0; !stop_requested; attempt++) {
        if (broker_dead_letter(w->broker, d, reason, error, attempts) == 0) return;
        log_warn("cannot dead-letter yet: %s", broker_error(w->broker));
        backoff_sleep(backoff_ms(attempt, 100, 5000), &stop_requested);
    }
}

/* After a failed attempt: records why, then retries later or gives up. */
static void attempt_failed(struct worker *w, const struct item *it) {
    const struct delivery *d = &it->d;
    const struct envelope *env = &it->env;
    int attempts = it->attempts;
    char error[600];
    snprintf(error, sizeof error, "%s: %s", cv_strerror(it->rc), it->error ? it->error : "");
    db_check(w);
    if (w->db) {
        char n[16];
        snprintf(n, sizeof n, "%d", attempts);
        const char *p[3] = {env->id, error, n};
        db_exec(w->db, "INSERT INTO command_attempts (id, attempts, last_error) VALUES ($1, $3, $2) "
                       "ON CONFLICT (id) DO UPDATE SET last_error = $2, updated_at = now()", 3, p, NULL, NULL);
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


/* Parses one delivered message and settles at once what cannot run here
 * (invalid, or a type this worker does not take). Returns true when it can. */
static bool admit(struct worker *w, struct item *it) {
    char err[256];
    if (envelope_parse(it->d.body, it->d.len, (size_t)w->cfg->max_message_bytes, it->d.message_id, &it->env, err,
                       sizeof err) < 0) {
        settle_dead(w, &it->d, "invalid_envelope", err, 0, NULL);
        return false;
    }
    /* A type this build has no handler for, or that this queue's `commands` does
     * not list (an older deployment), waits as a dead letter for an upgrade. */
    it->handler = handler_find(it->env.type);
    if (!it->handler || cfg_queue_for(w->cfg, it->env.type) != w->q) {
        if (!it->handler) snprintf(err, sizeof err, "no handler for command type '%s'", it->env.type);
        else snprintf(err, sizeof err, "queue '%s' does not take command type '%s' (its commands in the config)",
                      w->q->name, it->env.type);
        settle_dead(w, &it->d, "unknown_command", err, 0, it->env.id);
        return false;
    }
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(it->env.payload, "productId");
    it->key = cJSON_IsString(k) ? k->valuestring : "";
    return true;
}

/* Opens a transaction that commits without waiting for the disk (attempt
 * counts, NOTIFY): deferred, sent with the next statement. Returns 0 or an error class. */
static int begin_async(PGconn *db) {
    int rc = db_defer(db, "BEGIN", 0, NULL);
    return rc == 0 ? db_defer(db, "SET LOCAL synchronous_commit TO off", 0, NULL) : rc;
}

/* Drops what is deferred and rolls back the open transaction, if the connection still works. */
static void abandon_transaction(PGconn *db) {
    db_discard(db);
    if (PQstatus(db) == CONNECTION_OK) PQclear(PQexec(db, "ROLLBACK"));
}

/* "{id,id,...}" of the items whose outcome pick accepts; caller frees. */
static char *id_array(struct item **v, int n, bool (*pick)(const struct item *)) {
    char *s = malloc((size_t)n * (ID_LEN + 1) + 3), *p = s;
    *p++ = '{';
    for (int i = 0; i < n; i++)
        if (pick(v[i])) p += sprintf(p, "%s%s", p - s > 1 ? "," : "", v[i]->env.id);
    *p++ = '}';
    *p = '\0';
    return s;
}

static bool is_redelivered(const struct item *it) { return it->d.redelivered; }
static bool is_counted_settled(const struct item *it) { return it->counted && it->rc >= 0; }
static bool is_rejected(const struct item *it) { return it->rc == REJECTED; }
static bool is_retried(const struct item *it) { return it->claimed && it->rc < 0; }
static bool any_item(const struct item *it) { (void)it; return true; }

/* Counts one more start of the handler for each redelivered item, durably,
 * before any runs (one transaction that commits asynchronously: the counts
 * only have to survive this worker, not the database host); a first delivery
 * is attempt 1, not written. Items out of attempts are dead-lettered
 * (retries_exhausted); the others are marked live. Returns 0, or an error
 * class when the database is unreachable (nothing counted). */
static int count_attempts(struct worker *w, struct item **v, int n) {
    int nredelivered = 0;
    for (int i = 0; i < n; i++) {
        v[i]->attempts = 1;
        nredelivered += v[i]->d.redelivered;
    }
    if (nredelivered == 0) {
        for (int i = 0; i < n; i++) v[i]->live = true;
        return 0;
    }
    char *ids = id_array(v, n, is_redelivered);
    const char *params[1] = {ids};
    PGresult *r = NULL;
    /* no count yet: the delivery before this one started it (its worker died) */
    int rc = begin_async(w->db);
    if (rc == 0)
        rc = db_exec(w->db, "INSERT INTO command_attempts (id, attempts) "
                            "SELECT DISTINCT x, 2 FROM unnest($1::uuid[]) AS x "
                            "ON CONFLICT (id) DO UPDATE SET attempts = command_attempts.attempts + 1, "
                            "updated_at = now() RETURNING id::text, attempts, last_error", 1, params, &r, NULL);
    if (rc == 0) rc = db_cmd(w->db, "COMMIT");
    free(ids);
    if (rc < 0) {
        PQclear(r);
        abandon_transaction(w->db);
        return rc;
    }
    for (int i = 0; i < n; i++) {
        struct item *it = v[i];
        int row = -1;
        for (int j = 0; j < PQntuples(r) && row < 0 && it->d.redelivered; j++)
            if (strcasecmp(PQgetvalue(r, j, 0), it->env.id) == 0) row = j;
        it->live = true;
        if (row < 0) continue;
        it->counted = true;
        it->attempts = atoi(PQgetvalue(r, row, 1));
        if (it->attempts > w->q->max_attempts) {
            /* the handler was started max_attempts times (some of them killed their worker) */
            char why[700];
            snprintf(why, sizeof why, "gave up after %d attempts; last error: %s", it->attempts - 1,
                     !PQgetisnull(r, row, 2) ? PQgetvalue(r, row, 2) : "the worker died while handling it");
            settle_dead(w, &it->d, "retries_exhausted", why, it->attempts - 1, it->env.id);
            it->live = false;
        }
    }
    PQclear(r);
    return 0;
}

/* Stable order by key: every batch takes its rows' locks in the same order,
 * so concurrent batches do not deadlock; commands on one aggregate keep theirs. */
static void sort_by_key(struct item **v, int n) {
    for (int i = 1; i < n; i++) {
        struct item *x = v[i];
        int j = i;
        for (; j > 0 && strcmp(v[j - 1]->key, x->key) > 0; j--) v[j] = v[j - 1];
        v[j] = x;
    }
}

/* Opens the batch's transaction and inserts the dedup rows of its commands
 * (in id order, so concurrent batches cannot deadlock on them), deferred: they
 * go ahead of the next statement, in the same round trip, and claim_read reads
 * the result. Returns 0 or an error class. */
static int claim_send(struct worker *w, struct item **v, int n) {
    char *ids = id_array(v, n, any_item), *types = malloc((size_t)n * sizeof v[0]->env.type + 3), *t = types;
    *t++ = '{';
    for (int i = 0; i < n; i++) t += sprintf(t, "%s%s", i ? "," : "", v[i]->env.type); /* handler names */
    *t++ = '}';
    *t = '\0';
    const char *p[2] = {ids, types};
    PQclear(w->claim);
    int rc = db_defer(w->db, "BEGIN", 0, NULL);
    if (rc == 0)
        rc = db_defer_result(w->db, "INSERT INTO processed_commands (id, type, outcome) "
                                    "SELECT DISTINCT ON (id) id, type, 'applied' FROM unnest($1::uuid[], $2::text[]) "
                                    "AS c(id, type) ORDER BY id ON CONFLICT (id) DO NOTHING RETURNING id::text",
                             2, p, &w->claim);
    free(ids);
    free(types);
    return rc;
}

/* Reads what claim_send inserted (sending it first if nothing has since):
 * marks each item claimed, or DUPLICATE when its id was processed before (or
 * is earlier in this batch). Returns 0, or the error class that stopped the
 * insert (earlier_rc when it failed in an earlier round trip). */
static int claim_read(struct worker *w, struct item **v, int n, int earlier_rc) {
    int rc = w->claim ? 0 : db_flush(w->db);
    if (rc < 0) return rc;
    if (!w->claim) return earlier_rc < 0 ? earlier_rc : CV_EFATAL;
    for (int i = 0; i < n; i++) {
        bool fresh = false;
        for (int j = 0; j < PQntuples(w->claim) && !fresh; j++)
            fresh = strcasecmp(PQgetvalue(w->claim, j, 0), v[i]->env.id) == 0;
        for (int k = 0; k < i && fresh; k++) /* the same id twice: the first one runs */
            fresh = !(v[k]->claimed && strcasecmp(v[k]->env.id, v[i]->env.id) == 0);
        v[i]->claimed = fresh;
        if (!fresh) v[i]->rc = DUPLICATE; /* done before: nothing to do */
    }
    PQclear(w->claim);
    w->claim = NULL;
    return 0;
}

/* Ends the batch's transaction in one round trip: all its events into the
 * outbox, its dedup rows settled (a retried command's removed, a rejected
 * one's marked) and the attempt counts of the settled ones dropped (when
 * there are such), COMMIT, then the relay's wake-up. Returns 0 or an error
 * class (nothing committed, or the connection broke after the COMMIT was
 * sent: the retry finds the commands done). */
static int commit_batch(struct worker *w, struct item **v, int n) {
    cJSON *all = cJSON_CreateArray();
    for (int i = 0; i < n; i++)
        while (v[i]->events && v[i]->events->child)
            cJSON_AddItemToArray(all, cJSON_DetachItemViaPointer(v[i]->events, v[i]->events->child));
    int rc = 0;
    bool events = cJSON_GetArraySize(all) > 0;
    if (events) {
        char *json = cJSON_PrintUnformatted(all);
        const char *p[1] = {json};
        rc = db_defer(w->db, "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) "
                             "SELECT (e->>'id')::uuid, e->>'aggregateType', (e->>'aggregateId')::uuid, e->>'type', e "
                             "FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t(e, n) ORDER BY n", 1, p);
        free(json);
    }
    cJSON_Delete(all);
    bool settle = false;
    for (int i = 0; i < n; i++) settle |= is_retried(v[i]) || is_rejected(v[i]) || is_counted_settled(v[i]);
    if (rc == 0 && settle) {
        char *retried = id_array(v, n, is_retried), *rejected = id_array(v, n, is_rejected),
             *counted = id_array(v, n, is_counted_settled);
        const char *p[3] = {retried, rejected, counted};
        rc = db_defer(w->db, "WITH retried AS (DELETE FROM processed_commands WHERE id = ANY($1::uuid[])), "
                             "rejected AS (UPDATE processed_commands SET outcome = 'rejected' WHERE id = ANY($2::uuid[])) "
                             "DELETE FROM command_attempts WHERE id = ANY($3::uuid[])", 3, p);
        free(retried);
        free(rejected);
        free(counted);
    }
    /* Another pool's relay is the active one: NOTIFY it after the commit, in
     * the same round trip, as a transaction of its own that does not wait for
     * the disk (a NOTIFY inside the commands' transaction would hold
     * PostgreSQL's notify lock through that commit's flush, one worker at a time). */
    bool notify = events && !relay_wake_is_local();
    if (rc == 0 && notify) {
        rc = db_defer(w->db, "COMMIT", 0, NULL);
        if (rc == 0) rc = begin_async(w->db);
        if (rc == 0) rc = db_defer(w->db, w->notify_sql, 0, NULL);
    }
    if (rc == 0) rc = db_cmd(w->db, "COMMIT");
    if (rc == 0 && events && !notify) relay_wake_signal();
    return rc;
}

/* The most commands one window of run_ahead sends (two statements each:
 * db.c defers at most DEFER_MAX). */
#define AHEAD_MAX 64

/* Runs items i.. ahead, as many as run ahead (handler->runs_ahead): each one's
 * savepoint and its handler's first statement are sent together, in one round
 * trip (with what is deferred: in the batch's first window, BEGIN and the
 * claim), then each handler finishes in order with its result. The first
 * that does not finish that way (a duplicate, a statement that failed, a
 * handler that wants a second statement or rejects after its first) is rolled
 * back to its savepoint, which undoes those sent after it too. Returns the
 * index of the first item not settled (it then runs alone, not ahead), or an
 * error class that undid the batch. */
static int run_ahead(struct worker *w, struct item **v, int i, int n, bool *claim_pending) {
    PGconn *db = w->db;
    int end = i, rc = 0;
    for (; end < n && end - i < AHEAD_MAX && v[end]->handler->runs_ahead && !v[end]->alone; end++) {
        if (!*claim_pending && !v[end]->claimed) break; /* a known duplicate */
        struct cmd_ctx ctx = {.db = db, .cfg = w->cfg, .cmd = &v[end]->env, .ahead = AHEAD_SEND,
                              .first = &v[end]->first};
        int hrc = check_envelope_rules(&ctx);
        if (hrc == 0 && (rc = defer_savepoint(db, "SAVEPOINT", end)) == 0) hrc = v[end]->handler->run(&ctx);
        ctx_release(&ctx);
        if (rc < 0) return rc;
        if (hrc != CV_EAHEAD) { /* rejected before any statement (it runs alone), or deferring failed */
            if (hrc < 0 && hrc != CV_EREJECT) return hrc;
            break;
        }
    }
    if (end == i) return i;
    rc = db_flush(db); /* a failed statement leaves its result, and those after it, NULL */
    if (PQstatus(db) != CONNECTION_OK) return rc < 0 ? rc : CV_ERETRY;
    for (int j = i; j < end && rc < 0; j++)
        if (!v[j]->first) { /* the one that failed: not ahead again, whatever stops the window */
            v[j]->alone = true;
            break;
        }
    if (*claim_pending) {
        *claim_pending = false;
        int crc = claim_read(w, v, n, rc);
        if (crc < 0) return crc; /* the claim itself failed: the whole batch did */
    }
    int stop = end;
    for (int j = i; j < end && stop == end; j++) {
        struct item *it = v[j];
        if (!it->claimed || !it->first) {
            stop = j;
            continue;
        }
        struct cmd_ctx ctx = {.db = db, .cfg = w->cfg, .cmd = &it->env, .ahead = AHEAD_RESUME, .first = &it->first};
        if (it->handler->run(&ctx) == 0 && !it->first) {
            it->events = ctx.events;
            ctx.events = NULL;
            it->rc = APPLIED;
        } else {
            stop = j;
        }
        ctx_release(&ctx);
    }
    if (stop == end) return end;
    for (int j = stop; j < end; j++) { /* undone: they run again */
        bool claimed = v[j]->claimed;
        item_forget_outcome(v[j]);
        v[j]->claimed = claimed;
        if (!claimed) v[j]->rc = DUPLICATE;
    }
    rc = defer_savepoint(db, "ROLLBACK TO SAVEPOINT", stop);
    return rc < 0 ? rc : stop;
}

/* Runs the items in one transaction, each in its own savepoint when there
 * are several (a failing command is rolled back alone and retried later);
 * commits once. Commands whose handlers run ahead go in windows of one round
 * trip (run_ahead); any other runs alone, a round trip per statement. The
 * first command runs before the batch's dedup rows are known to be new (the
 * claim goes in its first round trip): a duplicate, which is rare, is then
 * undone. Sets each item's rc. Returns 0, or the error class that undid the
 * whole batch. */
static int run_batch(struct worker *w, struct item **v, int n) {
    PGconn *db = w->db;
    bool savepoints = n > 1;
    int rc = claim_send(w, v, n);
    bool claim_pending = rc == 0; /* its result not read yet */
    bool any = false; /* something to commit */
    for (int i = 0; i < n && rc == 0; i++) {
        if (savepoints) {
            int next = run_ahead(w, v, i, n, &claim_pending);
            if (next < 0) {
                rc = next;
                break;
            }
            any |= next > i;
            if ((i = next) == n) break;
        }
        if (!claim_pending && !v[i]->claimed) {
            any = true; /* a duplicate (its rc says so): its attempt count, if it has one, goes */
            continue;
        }
        v[i]->rc = run_command(w, v[i], savepoints ? i : -1);
        if (claim_pending) {
            claim_pending = false;
            if ((rc = claim_read(w, v, n, v[i]->rc)) < 0) {
                v[i]->rc = rc; /* the claim itself failed: the whole batch did */
                v[i]->error = strdup(db_last_error());
                break;
            }
            if (!v[i]->claimed) { /* done before: undo what it did */
                item_forget_outcome(v[i]);
                v[i]->rc = DUPLICATE;
                if (savepoints) rc = defer_savepoint(db, "ROLLBACK TO SAVEPOINT", i);
                else if ((rc = db_defer(db, "ROLLBACK", 0, NULL)) == 0) rc = db_defer(db, "BEGIN", 0, NULL);
                any = true;
                continue;
            }
        }
        if (v[i]->rc == REJECTED && !savepoints) {
            /* alone, without a savepoint: undo its writes, then record only its rejection */
            if ((rc = db_defer(db, "ROLLBACK", 0, NULL)) == 0 && (rc = claim_send(w, &v[i], 1)) == 0)
                rc = claim_read(w, &v[i], 1, 0);
            if (rc == 0 && !v[i]->claimed) { /* done meanwhile by another worker */
                cJSON_Delete(v[i]->events);
                v[i]->events = NULL;
            }
        }
        if (v[i]->rc >= 0) {
            any = true;
            continue;
        }
        v[i]->error = strdup(db_last_error());
        if (!savepoints || PQstatus(db) != CONNECTION_OK) rc = v[i]->rc;
        else rc = defer_savepoint(db, "ROLLBACK TO SAVEPOINT", i); /* this one alone is retried */
    }
    if (rc == 0 && any) rc = commit_batch(w, v, n);
    if (rc < 0 || !any) abandon_transaction(db); /* nothing of the batch was committed */
    PQclear(w->claim);
    w->claim = NULL;
    if (rc < 0)
        for (int i = 0; i < n; i++)
            if (v[i]->rc >= 0) {
                v[i]->rc = rc;
                free(v[i]->error);
                v[i]->error = strdup(db_last_error());
            }
    return rc;
}

/* Runs the n messages of a batch, then settles each: acks after the commit
 * (one ack for a batch that went through whole), retries or dead letters. */
static void process_batch(struct worker *w, struct item *items, int n) {
    struct item **v = malloc((size_t)n * sizeof *v);
    int nv = 0;
    for (int i = 0; i < n; i++)
        if (admit(w, &items[i])) v[nv++] = &items[i];
    if (nv > 0 && count_attempts(w, v, nv) < 0) {
        /* the database is away: hand them back and reconnect (they come back
         * redelivered, and one never started before is then counted as started once) */
        db_check(w);
        for (int i = 0; i < nv; i++)
            if (broker_requeue(w->broker, &v[i]->d) < 0)
                log_msg(LOG_WARN, v[i]->env.id, "requeue failed (%s); the broker returns it when the connection "
                        "closes", broker_error(w->broker));
        nv = 0;
    }
    int nlive = 0;
    for (int i = 0; i < nv; i++)
        if (v[i]->live) v[nlive++] = v[i];
    sort_by_key(v, nlive);
    if (nlive > 0 && run_batch(w, v, nlive) == CV_EFATAL && nlive > 1) {
        /* the database refused the batch as a whole (its outbox insert, say):
         * run each alone, so that only the command at fault fails */
        log_warn("a batch of %d failed as a whole (%s); running each command alone", nlive, db_last_error());
        for (int i = 0; i < nlive; i++) {
            item_forget_outcome(v[i]);
            run_batch(w, &v[i], 1);
        }
    }
    /* failures first: a retry acks its own delivery */
    for (int i = 0; i < nlive; i++) {
        if (v[i]->rc < 0) attempt_failed(w, v[i]);
        else log_msg(LOG_DEBUG, v[i]->env.id, "%s %s", v[i]->env.type, outcome_name[v[i]->rc]);
    }
    struct delivery *acks = malloc((size_t)n * sizeof *acks);
    int nacks = 0;
    for (int i = 0; i < n; i++) /* in arrival order */
        if (items[i].live && items[i].rc >= 0) acks[nacks++] = items[i].d;
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
    snprintf(w.notify_sql, sizeof w.notify_sql, "NOTIFY \"%s_outbox\"", cfg->prefix);
    char err[512];
    for (int attempt = 0, cls; !stop_requested && !w.broker; attempt++) {
        w.broker = broker_open_class(cfg, q->transport, &cls, err, sizeof err);
        if (!w.broker && cls == CV_ECONFIG) {
            log_error("broker refused the configuration: %s; stopping", err);
            return CV_EXIT_CONFIG;
        }
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
    /* one take hands over up to the prefetch (what is already delivered or
     * waiting: one Redis round trip and AOF sync for several transactions) */
    int take_max = q->prefetch > q->batch_size ? q->prefetch : q->batch_size;
    struct item *items = calloc((size_t)take_max, sizeof *items);
    struct delivery *extra = calloc((size_t)take_max, sizeof *extra);
    int status = 0;
    while (!stop_requested) {
        if (!w.db && !(w.db = db_connect_retry(cfg->database_url, &stop_requested))) { /* take nothing while the database is away */
            if (!stop_requested) status = CV_EXIT_CONFIG; /* refused: said by db_connect_retry */
            break;
        }
        /* a batch is what is already delivered; when nothing is, the first one is
         * waited for, and what came with it taken too */
        int want = take_max; /* and no more than max_jobs lets it run before it is recycled */
        if (cfg->max_jobs > 0 && cfg->max_jobs - w.jobs < want) want = (int)(cfg->max_jobs - w.jobs);
        if (want < 1) want = 1;
        int n = 0, rc = broker_take(w.broker, extra, want);
        if (rc == 0 && (rc = broker_next(w.broker, &extra[0], 1000)) > 0) {
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
        if (n == 0) continue;
        log_msg(LOG_DEBUG, NULL, "took %d message%s", n, n == 1 ? "" : "s");
        /* in transactions of batch_size, in arrival order; all of them, even
         * on stop (they are in hand) */
        for (int off = 0; off < n; off += q->batch_size)
            process_batch(&w, &items[off], n - off < q->batch_size ? n - off : q->batch_size);
        for (int i = 0; i < n; i++) {
            item_forget_outcome(&items[i]);
            delivery_free(&items[i].d);
            envelope_free(&items[i].env);
            memset(&items[i], 0, sizeof items[i]);
        }
        w.jobs += n;
        if (should_recycle(&w)) break;
    }
    free(items);
    free(extra);
    log_info("worker %s stopped", worker_id);
    broker_close(w.broker);
    db_close(w.db);
    return status;
}
