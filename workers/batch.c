/* batch.c - the transaction of a batch: the commands a worker took, run in one
 * PostgreSQL transaction with their dedup rows and outbox rows (worker.c takes
 * the messages and settles them; this file only talks to the database).
 *
 *   redelivered ones only: attempts += 1 (command_attempts, its own transaction,
 *                          before any handler; a first delivery is attempt 1)
 *                          (count_attempts)
 *   BEGIN; INSERT processed_commands(ids)     -- sent with the first command's first
 *                                              -- statement; a conflict: duplicate (the
 *                                              -- first command, run already, is undone)
 *   a batch with a command that locks several products (placeOrder, cancelOrder):
 *     SELECT ... FOR UPDATE of every product of the batch, in id order (lock_batch)
 *   per command, in the order of the rows they lock (batch_order, handler_lock_key):
 *     SAVEPOINT c<i> + the handler's statements -- the savepoint rides with the first
 *                                              -- rejected: ROLLBACK TO SAVEPOINT c<i>, command.rejected
 *                                              -- failed: ROLLBACK TO SAVEPOINT c<i>, settled alone
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
 *
 * Attempts: a message the broker never delivered before cannot have been
 * started, so its first start is not written down (a transaction saved per
 * batch). If the handler kills its worker, the broker hands the message out
 * again marked redelivered (RabbitMQ's flag, or Redis's returned set), and a
 * redelivered command with no count is taken to have been started once.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

void batch_init(struct batch *b, const struct cfg *cfg, const struct cfg_queue *q) {
    *b = (struct batch){.cfg = cfg, .q = q, .claim = -1};
    snprintf(b->notify_sql, sizeof b->notify_sql, "NOTIFY \"%s_outbox\"", cfg->prefix);
}

void batch_item_forget(struct batch_item *it) {
    free(it->error);
    cJSON_Delete(it->events);
    PQclear(it->first);
    it->error = NULL;
    it->events = NULL;
    it->first = NULL;
    it->claimed = false;
    it->rc = 0;
}

/* Rules that make a command rejected before its handler runs: the envelope's
 * (rather than dead), and its rate limit's verdict (over = "reject", no token). */
static int check_envelope_rules(struct cmd_ctx *ctx, const struct batch_item *it) {
    if (ctx->cmd->has_nul) {
        cJSON *f = cJSON_CreateObject();
        cJSON_AddStringToObject(f, "payload", "strings must not contain NUL characters (\\u0000)");
        return ctx_reject(ctx, "VALIDATION_FAILED", f, NULL, "a string holds a NUL character");
    }
    if (ctx->cmd->field_errors)
        return ctx_reject(ctx, "VALIDATION_FAILED", cJSON_Duplicate(ctx->cmd->field_errors, 1), NULL,
                          "the envelope breaks a rule");
    if (it->limit_rejected) {
        cJSON *d = cJSON_CreateObject();
        cJSON_AddStringToObject(d, "limit", it->limit->name);
        cJSON_AddNumberToObject(d, "retryAfterMs", (double)it->later_ms);
        return ctx_reject(ctx, "RATE_LIMITED", NULL, d, "rate limit '%s' (%s) has no token left; try again in %lld ms",
                          it->limit->name, it->limit->rate_text, (long long)it->later_ms);
    }
    return 0;
}

/* Defers "<verb> c<i>": the savepoint of the batch's i-th command. */
static int defer_savepoint(struct db *db, const char *verb, int i) {
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
static int run_command(struct batch *b, struct batch_item *it, int sp) {
    struct db *db = b->db;
    const struct envelope *env = &it->env;
    int rc;
    if (sp >= 0 && (rc = defer_savepoint(db, "SAVEPOINT", sp)) < 0) return rc;
    struct cmd_ctx ctx = {.db = db, .cfg = b->cfg, .cmd = env};
    if (!it->started_us) it->started_us = clock_mono_us(); /* the command's duration starts here */
    rc = check_envelope_rules(&ctx, it);
    if (rc == 0) rc = it->handler->run(&ctx);
    enum outcome outcome = OUTCOME_APPLIED;
    if (rc == CV_EREJECT) {
        outcome = OUTCOME_REJECTED;
        cJSON_Delete(ctx.events);
        ctx.events = NULL;
        /* undo what it wrote; sent with the next statement */
        if (sp >= 0 && (rc = defer_savepoint(db, "ROLLBACK TO SAVEPOINT", sp)) < 0) goto out;
        log_cmd(LOG_DEBUG, env, "%s rejected: %s (%s)", env->type, ctx.rej.code, ctx.rej.message);
        ctx_emit_rejection(&ctx);
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

/* Opens a transaction that commits without waiting for the disk (attempt
 * counts, NOTIFY): deferred, sent with the next statement. Returns 0 or an error class. */
static int begin_async(struct db *db) {
    int rc = db_defer(db, "BEGIN", 0, NULL);
    return rc == 0 ? db_defer(db, "SET LOCAL synchronous_commit TO off", 0, NULL) : rc;
}

/* Drops what is deferred and rolls back the open transaction, if the connection still works. */
static void abandon_transaction(struct db *db) {
    db_discard(db);
    if (db_ok(db)) (void)db_cmd(db, "ROLLBACK"); /* a failure is logged, and the connection then dropped */
}

/* The array literal of the ids of the items pick accepts (db_array); caller frees; never NULL. */
static char *id_array(struct batch_item **v, int n, bool (*pick)(const struct batch_item *)) {
    const char **ids = xmalloc((size_t)(n ? n : 1) * sizeof *ids);
    for (int i = 0; i < n; i++) ids[i] = pick(v[i]) ? v[i]->env.id : NULL;
    char *s = db_array(ids, n);
    free(ids);
    return s;
}

/* The array literal of a cJSON array of strings (db_array); caller frees; never NULL. */
static char *json_array_literal(const cJSON *a) {
    int n = cJSON_GetArraySize(a), i = 0;
    const char **items = xmalloc((size_t)(n ? n : 1) * sizeof *items);
    const cJSON *e;
    cJSON_ArrayForEach(e, a) items[i++] = e->valuestring;
    char *s = db_array(items, n);
    free(items);
    return s;
}

static bool is_redelivered(const struct batch_item *it) { return it->d.redelivered; }
static bool is_counted_settled(const struct batch_item *it) { return it->counted && it->rc >= 0; }
static bool is_rejected(const struct batch_item *it) { return it->rc == OUTCOME_REJECTED; }
static bool is_retried(const struct batch_item *it) { return it->claimed && it->rc < 0; }
static bool any_item(const struct batch_item *it) { (void)it; return true; }

/* Counts one more start of the handler for each redelivered item, durably,
 * before any runs (one transaction that commits asynchronously: the counts
 * only have to survive this worker, not the database host); a first delivery
 * is attempt 1, not written. Sets each item's attempts; an item out of
 * attempts is marked exhausted (its error says why), the others live.
 * Returns 0, or the error class of a failed statement (CV_ERETRY, CV_EREFUSED):
 * then the transaction is rolled back, nothing is counted and no item is marked
 * live or exhausted (each has attempts 1). */
static int count_attempts(struct batch *b, struct batch_item **v, int n) {
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
    int rc = begin_async(b->db);
    if (rc == 0)
        rc = db_exec(b->db, "INSERT INTO command_attempts (id, attempts) "
                            "SELECT DISTINCT x, 2 FROM unnest($1::uuid[]) AS x "
                            "ON CONFLICT (id) DO UPDATE SET attempts = command_attempts.attempts + 1, "
                            "updated_at = now() RETURNING id::text, attempts, last_error", 1, params, &r);
    if (rc == 0) rc = db_cmd(b->db, "COMMIT");
    free(ids);
    if (rc < 0) {
        PQclear(r);
        abandon_transaction(b->db);
        return rc;
    }
    for (int i = 0; i < n; i++) {
        struct batch_item *it = v[i];
        int row = -1;
        for (int j = 0; j < PQntuples(r) && row < 0 && it->d.redelivered; j++)
            if (strcasecmp(PQgetvalue(r, j, 0), it->env.id) == 0) row = j;
        it->live = true;
        if (row < 0) continue;
        it->counted = true;
        it->attempts = atoi(PQgetvalue(r, row, 1));
        if (it->attempts > b->q->max_attempts) {
            /* the handler was started max_attempts times (some of them killed their worker) */
            char why[700];
            snprintf(why, sizeof why, "gave up after %d attempts; last error: %s", it->attempts - 1,
                     !PQgetisnull(r, row, 2) ? PQgetvalue(r, row, 2) : "the worker died while handling it");
            free(it->error);
            it->error = xstrdup(why);
            it->attempts--; /* the starts it had */
            it->live = false;
            it->exhausted = true;
        }
    }
    PQclear(r);
    return 0;
}

/* Opens the batch's transaction and inserts the dedup rows of its commands
 * (in id order, so concurrent batches cannot deadlock on them), deferred: they
 * go ahead of the next statement, in the same round trip, and claim_read reads
 * the result. Returns 0 or an error class. */
static int claim_send(struct batch *b, struct batch_item **v, int n) {
    const char **type_list = xmalloc((size_t)n * sizeof *type_list);
    for (int i = 0; i < n; i++) type_list[i] = v[i]->env.type;
    char *ids = id_array(v, n, any_item), *types = db_array(type_list, n);
    free(type_list);
    const char *p[2] = {ids, types};
    int rc = db_defer(b->db, "BEGIN", 0, NULL);
    if (rc == 0)
        rc = db_defer_result(b->db, "INSERT INTO processed_commands (id, type, outcome) "
                                    "SELECT DISTINCT ON (id) id, type, 'applied' FROM unnest($1::uuid[], $2::text[]) "
                                    "AS c(id, type) ORDER BY id ON CONFLICT (id) DO NOTHING "
                                    "RETURNING id::text, pg_current_xact_id()::text",
                             2, p);
    free(ids);
    free(types);
    if (rc < 0) return rc;
    b->claim = rc;
    return 0;
}

/* A batch with a command that locks several products (placeOrder, cancelOrder)
 * cannot be ordered so that every lock comes in one order: it locks every
 * product its commands will lock first, in id order, in one statement (the
 * BEGIN and the claim ride with it), and the commands then find them held.
 * Returns 0 (also when there is nothing to do) or the statement's error class. */
static int lock_batch(struct batch *b, struct batch_item **v, int n) {
    if (n < 2 || !batch_locks_several(v, n)) return 0;
    cJSON *products = cJSON_CreateArray(), *orders = cJSON_CreateArray();
    for (int i = 0; i < n; i++) handler_lock_rows(v[i]->handler, v[i]->env.payload, products, orders);
    char *pa = json_array_literal(products), *oa = json_array_literal(orders);
    const char *p[2] = {pa, oa};
    int rc = db_exec(b->db, "SELECT 1 FROM products WHERE id = ANY($1::uuid[]) OR id IN "
                            "(SELECT product_id FROM order_items WHERE order_id = ANY($2::uuid[])) "
                            "ORDER BY id FOR UPDATE", 2, p, NULL);
    free(pa);
    free(oa);
    cJSON_Delete(products);
    cJSON_Delete(orders);
    return rc;
}

/* Reads what claim_send inserted (sending it first if nothing has since):
 * marks each item claimed, or OUTCOME_DUPLICATE when its id was processed before (or
 * is earlier in this batch). Returns 0, or the error class that stopped the
 * insert (earlier_rc when it failed in an earlier round trip). */
static int claim_read(struct batch *b, struct batch_item **v, int n, int earlier_rc) {
    PGresult *claim = NULL;
    int rc = b->claim >= 0 ? db_take_result(b->db, b->claim, &claim) : 0;
    b->claim = -1;
    if (rc < 0) return rc;
    if (!claim) return earlier_rc < 0 ? earlier_rc : CV_EREFUSED;
    /* the transaction's id, for the counts of its commit (a row inserted: it has one) */
    b->xid = PQntuples(claim) > 0 ? strtoull(PQgetvalue(claim, 0, 1), NULL, 10) : 0;
    for (int i = 0; i < n; i++) {
        bool fresh = false;
        for (int j = 0; j < PQntuples(claim) && !fresh; j++)
            fresh = strcasecmp(PQgetvalue(claim, j, 0), v[i]->env.id) == 0;
        for (int k = 0; k < i && fresh; k++) /* the same id twice: the first one runs */
            fresh = !(v[k]->claimed && strcasecmp(v[k]->env.id, v[i]->env.id) == 0);
        v[i]->claimed = fresh;
        if (!fresh) v[i]->rc = OUTCOME_DUPLICATE; /* done before: nothing to do */
    }
    PQclear(claim);
    return 0;
}

/* Ends the batch's transaction in one round trip: all its events into the
 * outbox, its dedup rows settled (a retried command's removed, a rejected
 * one's marked) and the attempt counts of the settled ones dropped (when
 * there are such), COMMIT, then the relay's wake-up. Returns 0 or an error
 * class (nothing committed, or the connection broke after the COMMIT was
 * sent: the retry finds the commands done). */
static int commit_batch(struct batch *b, struct batch_item **v, int n) {
    /* what this commit counts, noted before it can happen: a worker killed
     * between the COMMIT and its counting leaves it to its slot's next process */
    scoreboard_pending_begin();
    for (int i = 0; i < n; i++)
        if (v[i]->rc >= 0) scoreboard_pending_add(v[i]->env.type, (enum sb_outcome)v[i]->rc);
    scoreboard_pending_arm(b->xid);
    cJSON *all = cJSON_CreateArray();
    for (int i = 0; i < n; i++)
        while (v[i]->events && v[i]->events->child)
            cJSON_AddItemToArray(all, cJSON_DetachItemViaPointer(v[i]->events, v[i]->events->child));
    int rc = 0;
    bool events = cJSON_GetArraySize(all) > 0;
    if (events) rc = event_outbox_defer(b->db, all);
    cJSON_Delete(all);
    if (rc < 0) return rc;
    if (rc == 0) rc = rate_limit_refund_defer(b->db, v, n); /* the tokens of those that did no work */
    bool settle = false;
    for (int i = 0; i < n; i++) settle |= is_retried(v[i]) || is_rejected(v[i]) || is_counted_settled(v[i]);
    if (rc == 0 && settle) {
        char *retried = id_array(v, n, is_retried), *rejected = id_array(v, n, is_rejected),
             *counted = id_array(v, n, is_counted_settled);
        const char *p[3] = {retried, rejected, counted};
        rc = db_defer(b->db, "WITH retried AS (DELETE FROM processed_commands WHERE id = ANY($1::uuid[])), "
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
    int committed = -1; /* with the NOTIFY: the handle of the batch's COMMIT */
    if (rc == 0 && notify && (committed = rc = db_defer_result(b->db, "COMMIT", 0, NULL)) >= 0) {
        rc = begin_async(b->db);
        if (rc == 0) rc = db_defer(b->db, b->notify_sql, 0, NULL);
    }
    if (rc == 0) rc = db_cmd(b->db, "COMMIT");
    PGresult *done = NULL;
    if (rc < 0 && committed >= 0 && db_take_result(b->db, committed, &done) == 0 && done) {
        /* the batch committed; only the NOTIFY's own transaction failed: the
         * relay finds the events at its next poll */
        PQclear(done);
        log_warn("the relay's wake-up (NOTIFY) failed after the commit: %s", db_errstr(b->db));
        if (db_ok(b->db)) (void)db_cmd(b->db, "ROLLBACK"); /* the NOTIFY's transaction */
        rc = 0;
    }
    if (rc == 0 && events && !notify) relay_wake_signal();
    return rc;
}

/* The most commands one window of run_ahead sends (two statements each, in one pipeline). */
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
static int run_ahead(struct batch *b, struct batch_item **v, int i, int n, bool *claim_pending) {
    struct db *db = b->db;
    int end = i, rc = 0;
    for (; end < n && end - i < AHEAD_MAX && v[end]->handler->runs_ahead && !v[end]->alone && !v[end]->parked;
         end++) {
        if (!*claim_pending && !v[end]->claimed) break; /* a known duplicate */
        v[end]->handle = -1;
        if (!v[end]->started_us) v[end]->started_us = clock_mono_us();
        struct cmd_ctx ctx = {.db = db, .cfg = b->cfg, .cmd = &v[end]->env, .ahead = AHEAD_SEND,
                              .handle = &v[end]->handle};
        int hrc = check_envelope_rules(&ctx, v[end]);
        if (hrc == 0 && (rc = defer_savepoint(db, "SAVEPOINT", end)) == 0) hrc = v[end]->handler->run(&ctx);
        ctx_release(&ctx);
        if (rc < 0) return rc;
        if (!ctx.paused) { /* rejected before any statement (it runs alone), or deferring failed */
            if (hrc < 0 && hrc != CV_EREJECT) return hrc;
            break;
        }
    }
    if (end == i) return i;
    rc = db_flush(db); /* a failed statement leaves its result, and those after it, NULL */
    if (!db_ok(db)) return rc < 0 ? rc : CV_ERETRY;
    for (int j = i; j < end; j++) { /* each one's first result, from its handle (the statements have run) */
        PQclear(v[j]->first);
        v[j]->first = NULL;
        if (v[j]->handle >= 0) (void)db_take_result(db, v[j]->handle, &v[j]->first);
        v[j]->handle = -1;
    }
    for (int j = i; j < end && rc < 0; j++)
        if (!v[j]->first) { /* the one that failed: not ahead again, whatever stops the window */
            v[j]->alone = true;
            break;
        }
    if (*claim_pending) {
        *claim_pending = false;
        int crc = claim_read(b, v, n, rc);
        if (crc < 0) return crc; /* the claim itself failed: the whole batch did */
    }
    int stop = end;
    for (int j = i; j < end && stop == end; j++) {
        struct batch_item *it = v[j];
        if (!it->claimed || !it->first) {
            stop = j;
            continue;
        }
        struct cmd_ctx ctx = {.db = db, .cfg = b->cfg, .cmd = &it->env, .ahead = AHEAD_RESUME, .first = &it->first};
        if (it->handler->run(&ctx) == 0 && !it->first) {
            it->events = ctx.events;
            ctx.events = NULL;
            it->rc = OUTCOME_APPLIED;
        } else {
            stop = j;
        }
        ctx_release(&ctx);
    }
    if (stop == end) return end;
    for (int j = stop; j < end; j++) { /* undone: they run again */
        bool claimed = v[j]->claimed;
        batch_item_forget(v[j]);
        v[j]->claimed = claimed;
        if (!claimed) v[j]->rc = OUTCOME_DUPLICATE;
    }
    rc = defer_savepoint(db, "ROLLBACK TO SAVEPOINT", stop);
    return rc < 0 ? rc : stop;
}

/* Moves the items parked (rate_limit_take, key_hold_check, key_hold_failed) to the end of v, the others keeping
 * their order, and sets *np to how many others there are. Returns how many it moved. */
static int park_apart(struct batch_item **v, int *np) {
    int n = *np, kept = 0, k = 0;
    struct batch_item **waiting = xmalloc((size_t)n * sizeof *waiting);
    for (int i = 0; i < n; i++) {
        if (v[i]->parked) waiting[k++] = v[i];
        else v[kept++] = v[i];
    }
    memcpy(&v[kept], waiting, (size_t)k * sizeof *waiting);
    free(waiting);
    *np = kept;
    return k;
}

/* Runs the items in one transaction, each in its own savepoint when there are
 * several (a failing command is rolled back alone and settled on its own),
 * and commits once. Before the COMMIT is sent, the outcomes it commits are
 * armed in the scoreboard with the transaction's id (commit_batch); count_outcomes
 * settles them. Sets each item's rc (an outcome, or the error class of
 * its failure, with error), and moves the items' events into the outbox.
 * Commands of a rate-limited type first take their tokens (rate_limit_take):
 * those parked for one are moved to the end of v and *np no longer counts
 * them (their caller acks them once this returns 0).
 * Returns 0, or the error class that undid the whole batch: then every item
 * that had not failed on its own carries it, with error, the parked ones are
 * back in *np, and the transaction is rolled back (if the connection broke
 * after the COMMIT was sent, it may have committed: the retry finds the
 * commands done). */
static int run_batch(struct batch *b, struct batch_item **v, int *np) {
    struct db *db = b->db;
    int n = *np, parked = 0;
    b->claim = -1;
    b->xid = 0;
    bool limited = false;
    for (int i = 0; i < n; i++) {
        rate_limit_forget(v[i]); /* a new transaction: no token held */
        limited |= v[i]->limit != NULL;
    }
    /* a limited command rejected alone keeps its limit's count, and a failed
     * command of an ordered queue holds its key in this transaction: savepoints then too */
    bool ordered = b->q->ordered;
    bool savepoints = n > 1 || limited || ordered;
    int rc = claim_send(b, v, n);
    bool claim_pending = rc == 0; /* its result not read yet */
    if (rc == 0 && (limited || ordered)) { /* the claims first (a duplicate neither waits nor takes a token) */
        claim_pending = false;
        rc = claim_read(b, v, n, 0);
    }
    /* those behind a held key wait, and take no token; then those without a token wait
     * (each step returns how many it parked, or an error class) */
    if (rc == 0 && ordered && (rc = key_hold_check(db, b->q, v, n)) > 0) rc = 0, parked += park_apart(v, np), n = *np;
    if (rc == 0 && limited && (rc = rate_limit_take(db, b->q, v, n)) > 0) rc = 0, parked += park_apart(v, np), n = *np;
    int behind = 0; /* parked behind a command of their key that failed in this batch */
    if (rc == 0) rc = lock_batch(b, v, n);
    bool any = parked > 0; /* something to commit */
    for (int i = 0; i < n && rc == 0; i++) {
        if (v[i]->parked) continue; /* behind a command of its key that failed */
        if (savepoints) {
            int next = run_ahead(b, v, i, n, &claim_pending);
            if (next < 0) {
                rc = next;
                break;
            }
            any |= next > i;
            if ((i = next) == n) break;
            if (v[i]->parked) continue;
        }
        if (!claim_pending && !v[i]->claimed) {
            any = true; /* a duplicate (its rc says so): its attempt count, if it has one, goes */
            continue;
        }
        v[i]->rc = run_command(b, v[i], savepoints ? i : -1);
        if (claim_pending) {
            claim_pending = false;
            if ((rc = claim_read(b, v, n, v[i]->rc)) < 0) {
                v[i]->rc = rc; /* the claim itself failed: the whole batch did */
                v[i]->error = xstrdup(db_errstr(b->db));
                break;
            }
            if (!v[i]->claimed) { /* done before: undo what it did */
                batch_item_forget(v[i]);
                v[i]->rc = OUTCOME_DUPLICATE;
                if (savepoints) rc = defer_savepoint(db, "ROLLBACK TO SAVEPOINT", i);
                else if ((rc = db_defer(db, "ROLLBACK", 0, NULL)) == 0) rc = db_defer(db, "BEGIN", 0, NULL);
                any = true;
                continue;
            }
        }
        if (v[i]->rc == OUTCOME_REJECTED && !savepoints) {
            /* alone, without a savepoint: undo its writes, then record only its rejection */
            if ((rc = db_defer(db, "ROLLBACK", 0, NULL)) == 0 && (rc = claim_send(b, &v[i], 1)) == 0)
                rc = claim_read(b, &v[i], 1, 0);
            if (rc == 0 && !v[i]->claimed) { /* done meanwhile by another worker */
                cJSON_Delete(v[i]->events);
                v[i]->events = NULL;
            }
        }
        if (v[i]->rc >= 0) {
            any = true;
            continue;
        }
        v[i]->error = xstrdup(db_errstr(b->db));
        if (!savepoints || !db_ok(db)) rc = v[i]->rc;
        else if ((rc = defer_savepoint(db, "ROLLBACK TO SAVEPOINT", i)) == 0) /* this one alone is retried */
            behind += key_hold_failed(b->q, v, i, n, batch_will_retry(b->q, v[i])); /* and holds its key */
        any |= v[i]->will_hold || v[i]->holder; /* the hold, or its passing on, is committed, alone if need be */
    }
    if (rc == 0 && behind > 0) {
        parked += park_apart(v, np);
        n = *np;
        any = true;
    }
    if (rc == 0 && any && ordered) {
        rc = key_hold_settle_defer(db, b->q, v, n, &v[n], behind);
        if (rc == 0) rc = rate_limit_refund_defer(db, &v[n], behind); /* their tokens, if they took any */
    }
    if (rc == 0 && any) rc = commit_batch(b, v, n);
    if (rc < 0 || !any) abandon_transaction(db); /* nothing of the batch was committed */
    db_release_results(db); /* what no one took (the claim of a batch that failed early) */
    b->claim = -1;
    if (rc < 0 && parked > 0) { /* their parking was undone with the rest: they are in the batch again */
        for (int i = n; i < n + parked; i++) {
            v[i]->parked = false;
            v[i]->behind = false;
            v[i]->rc = 0;
        }
        *np = n = n + parked;
    }
    if (rc < 0)
        for (int i = 0; i < n; i++)
            if (v[i]->rc >= 0) {
                v[i]->rc = rc;
                free(v[i]->error);
                v[i]->error = xstrdup(db_errstr(b->db));
            }
    return rc;
}


bool batch_will_retry(const struct cfg_queue *q, const struct batch_item *it) {
    return it->rc == CV_ERETRY && it->attempts < q->max_attempts;
}

/* count_outcomes counts an outcome as the scoreboard's outcome of the same number */
_Static_assert(OUTCOME_APPLIED == (int)SB_APPLIED && OUTCOME_REJECTED == (int)SB_REJECTED &&
                   OUTCOME_DUPLICATE == (int)SB_DUPLICATE, "enum outcome and enum sb_outcome disagree");

/* After run_batch returned rc for the n items v: counts the outcomes it
 * committed (rc 0), with their duration and latency, then forgets the pending
 * copy run_batch armed; after an error on a connection that still works
 * (nothing committed) only forgets it; after a broken connection leaves it
 * pending, for the worker's reconciliation once reconnected (the COMMIT may
 * have been applied). */
static void count_outcomes(struct batch *b, struct batch_item **v, int n, int rc) {
    if (rc < 0) {
        if (db_ok(b->db)) scoreboard_pending_drop();
        return;
    }
    int64_t commit_us = clock_mono_us(), commit_ms = clock_ms();
    for (int i = 0; i < n; i++) {
        if (v[i]->rc < 0) continue; /* failed alone: the worker settles it */
        log_cmd(LOG_DEBUG, &v[i]->env, "%s %s", v[i]->env.type, sb_outcome_names[v[i]->rc]);
        /* enum outcome and enum sb_outcome agree on applied, rejected, duplicate */
        scoreboard_committed(v[i]->env.type, (enum sb_outcome)v[i]->rc, v[i]->started_us, commit_us,
                             v[i]->env.created_ms, commit_ms);
    }
    scoreboard_pending_drop();
}

int batch_process(struct batch *b, struct batch_item **v, int n) {
    if (n == 0) return 0;
    int rc = count_attempts(b, v, n);
    if (rc < 0) return rc;
    /* a command of an ordered queue out of attempts passes its key on before it is dead-lettered */
    if ((rc = key_hold_release_exhausted(b->db, b->q, v, n)) < 0) return rc;
    struct batch_item **live = xmalloc((size_t)n * sizeof *live);
    int nlive = 0;
    for (int i = 0; i < n; i++)
        if (v[i]->live) live[nlive++] = v[i];
    batch_order(live, nlive);
    if (nlive > 0) {
        scoreboard_current(live[0]->env.id, live[0]->env.type);
        rc = run_batch(b, live, &nlive); /* those it parked for a token are moved past nlive */
        count_outcomes(b, live, nlive, rc);
    }
    if (rc == CV_EREFUSED && nlive > 1) {
        /* the database refused the batch as a whole (its outbox insert, say):
         * run each alone, so that only the command at fault fails */
        log_warn("a batch of %d failed as a whole (%s); running each command alone", nlive, db_errstr(b->db));
        for (int i = 0; i < nlive; i++) {
            batch_item_forget(live[i]);
            int one = 1;
            int orc = run_batch(b, &live[i], &one);
            count_outcomes(b, &live[i], one, orc);
        }
    }
    free(live);
    return 0;
}
