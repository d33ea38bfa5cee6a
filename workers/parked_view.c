/* parked_view.c - the parked commands as an operator sees them (conveyor-admin
 * scheduled, the dashboard, /metrics): how many wait per queue and when the
 * next is due, a page of them in due order, and the cancel of one.
 *
 * parked_commands (sql/0010) is the one place a command waits for its time;
 * the timekeeper publishes a row once due and deletes it after the broker's
 * confirm. A cancel deletes the row and settles the command as a worker would
 * have rejected it, in one transaction: processed_commands (id, type,
 * 'rejected'), so a copy published meanwhile is found done, and one
 * command.rejected event (code CANCELLED) through the outbox, which a NOTIFY
 * makes the active relay publish.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CANCEL_LOCK_TIMEOUT "SET LOCAL lock_timeout TO '3s'"
#define CANCEL_CODE "CANCELLED"
#define CANCEL_MESSAGE "cancelled by an operator before its time"
/* the cursor's due time: RFC 3339 UTC with microseconds, exact for a timestamptz */
/* a command waiting behind its key (reason 'ordered', key_hold.c) is due at 'infinity' */
#define SQL_DUE_EXACT "coalesce(to_char(due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), 'infinity')"

int parked_counts(struct db *db, const struct cfg *cfg, struct parked_queue_stat *out) {
    memset(out, 0, (size_t)cfg->nqueues * sizeof *out);
    const char **names = xcalloc((size_t)cfg->nqueues + 1, sizeof *names);
    for (int i = 0; i < cfg->nqueues; i++) names[i] = cfg->queues[i].name;
    char *arr = db_array(names, cfg->nqueues);
    free(names);
    const char *p[1] = {arr};
    PGresult *r;
    /* per configured queue, one index-only walk of parked_commands_queue (queue, due_at) */
    int rc = db_exec(db, "SELECT c.n, " SQL_RFC3339("c.next") ", coalesce(extract(epoch FROM c.next), 0)::float8 "
                         "FROM unnest($1::text[]) WITH ORDINALITY AS q(name, i) CROSS JOIN LATERAL "
                         "(SELECT count(*) AS n, min(due_at) AS next FROM parked_commands WHERE queue = q.name) c "
                         "ORDER BY q.i", 1, p, &r);
    free(arr);
    if (rc < 0) return rc;
    for (int i = 0; i < PQntuples(r) && i < cfg->nqueues; i++) {
        out[i].count = atol(PQgetvalue(r, i, 0));
        snprintf(out[i].next_due, sizeof out[i].next_due, "%s", PQgetvalue(r, i, 1));
        out[i].next_due_s = atof(PQgetvalue(r, i, 2));
    }
    PQclear(r);
    return 0;
}

void parked_page_free(struct parked_page *p) {
    if (!p) return;
    free(p->rows);
    memset(p, 0, sizeof *p);
}

/* Splits a cursor "<due, RFC 3339>_<id>" into due (n bytes) and id; false when it is not one. */
static bool cursor_parse(const char *cursor, char *due, size_t n, char id[ID_LEN + 1]) {
    const char *sep = strrchr(cursor, '_');
    if (!sep || (size_t)(sep - cursor) >= n || !id_parse(sep + 1, id)) return false;
    snprintf(due, n, "%.*s", (int)(sep - cursor), cursor);
    return strcmp(due, "infinity") == 0 || clock_rfc3339_valid(due);
}

/* Copies row i of r (the page query's columns) into *row. */
static void row_copy(const PGresult *r, int i, struct parked_row *row) {
    snprintf(row->id, sizeof row->id, "%s", PQgetvalue(r, i, 0));
    snprintf(row->queue, sizeof row->queue, "%s", PQgetvalue(r, i, 1));
    snprintf(row->type, sizeof row->type, "%s", PQgetvalue(r, i, 2));
    snprintf(row->reason, sizeof row->reason, "%s", PQgetvalue(r, i, 3));
    snprintf(row->schedule, sizeof row->schedule, "%s", PQgetvalue(r, i, 4));
    snprintf(row->due_at, sizeof row->due_at, "%s", PQgetvalue(r, i, 5));
    snprintf(row->parked_at, sizeof row->parked_at, "%s", PQgetvalue(r, i, 6));
}

int parked_page_read(struct db *db, const char *queue, const char *cursor, int limit, struct parked_page *out,
                     char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    char due[48] = "-infinity", id[ID_LEN + 1] = "00000000-0000-0000-0000-000000000000";
    if (limit < 1 || limit > PARKED_PAGE_MAX) {
        snprintf(err, errlen, "the limit must be 1 to %d", PARKED_PAGE_MAX);
        return CV_EREJECT;
    }
    if (cursor && *cursor && !cursor_parse(cursor, due, sizeof due, id)) {
        snprintf(err, errlen, "'%.60s' is not a cursor of scheduled list", cursor);
        return CV_EREJECT;
    }
    char lim[16];
    snprintf(lim, sizeof lim, "%d", limit + 1); /* one more: is there a next page? */
    const char *p[4] = {due, id, lim, queue};
    PGresult *r;
    /* two statements, not "$4 IS NULL OR": each keeps its own index (due order, or queue then due) */
#define PAGE_SQL(where)                                                                                         \
    "SELECT id, queue, type, reason, coalesce(schedule, ''), " SQL_RFC3339("due_at") ", " SQL_RFC3339("parked_at") \
    ", " SQL_DUE_EXACT " FROM parked_commands WHERE " where "(due_at, id) > ($1::timestamptz, $2::uuid) "       \
    "ORDER BY due_at, id LIMIT $3::int"
    int rc = queue ? db_exec(db, PAGE_SQL("queue = $4 AND "), 4, p, &r) : db_exec(db, PAGE_SQL(""), 3, p, &r);
#undef PAGE_SQL
    if (rc < 0) {
        snprintf(err, errlen, "cannot read the parked commands: %s", db_errstr(db));
        return rc;
    }
    int n = PQntuples(r) > limit ? limit : PQntuples(r);
    out->rows = xcalloc((size_t)n + 1, sizeof *out->rows);
    for (int i = 0; i < n; i++) row_copy(r, i, &out->rows[i]);
    out->n = n;
    if (PQntuples(r) > limit)
        snprintf(out->next, sizeof out->next, "%s_%s", PQgetvalue(r, n - 1, 7), out->rows[n - 1].id);
    PQclear(r);
    return 0;
}

cJSON *parked_row_json(const struct parked_row *row) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", row->id);
    cJSON_AddStringToObject(o, "queue", row->queue);
    cJSON_AddStringToObject(o, "type", row->type);
    cJSON_AddStringToObject(o, "reason", row->reason);
    json_add_optional(o, "schedule", row->schedule[0] ? row->schedule : NULL);
    /* null: waiting behind an earlier command of its key (reason "ordered"), no time */
    if (row->due_at[0]) cJSON_AddStringToObject(o, "dueAt", row->due_at);
    else cJSON_AddNullToObject(o, "dueAt");
    cJSON_AddStringToObject(o, "parkedAt", row->parked_at);
    return o;
}

/* The command.rejected event (code CANCELLED) of the parked command id of
 * type, whose stored message is envelope: a JSON array of that one event,
 * made as a worker makes a rejection's (ctx_emit_rejection), with the
 * command's correlationId and trace. A message that no longer parses (it
 * did when it was parked) gives the event of its id and type alone. */
static cJSON *cancel_events(const struct cfg *cfg, const char *id, const char *type, const char *envelope) {
    struct envelope env;
    char err[256];
    if (envelope_parse(envelope, strlen(envelope), (size_t)cfg->max_message_bytes, id, &env, err, sizeof err) < 0) {
        log_warn("the parked message of %s does not parse (%s): its event carries its id and type only", id, err);
        memset(&env, 0, sizeof env);
        snprintf(env.id, sizeof env.id, "%s", id);
        snprintf(env.type, sizeof env.type, "%s", type);
        env.created_ms = -1;
    }
    struct cmd_ctx ctx = {.cfg = cfg, .cmd = &env};
    (void)ctx_reject(&ctx, CANCEL_CODE, NULL, NULL, "%s", CANCEL_MESSAGE);
    ctx_emit_rejection(&ctx);
    envelope_free(&env);
    return ctx.events;
}

/* Inside the cancel's transaction, the parked row of id deleted (its queue,
 * type, envelope in r's row 0): its dedup row, and when that is new its event
 * and the relay's NOTIFY, then COMMIT. Fills out; returns 0 or an error class. */
static int settle_cancel(struct db *db, const struct cfg *cfg, const char *id, const PGresult *del,
                         struct parked_cancel *out) {
    snprintf(out->queue, sizeof out->queue, "%s", PQgetvalue(del, 0, 0));
    snprintf(out->type, sizeof out->type, "%s", PQgetvalue(del, 0, 1));
    const char *p[2] = {id, out->type};
    PGresult *r;
    int rc = db_exec(db, "INSERT INTO processed_commands (id, type, outcome) VALUES ($1, $2, 'rejected') "
                         "ON CONFLICT (id) DO NOTHING RETURNING id", 2, p, &r);
    if (rc < 0) return rc;
    bool fresh = PQntuples(r) == 1;
    PQclear(r);
    if (!fresh) return CV_EREJECT; /* done already (taken between the timekeeper's publish and its delete) */
    cJSON *events = cancel_events(cfg, id, out->type, PQgetvalue(del, 0, 2));
    const cJSON *ev_id = cJSON_GetObjectItemCaseSensitive(events->child, "id");
    snprintf(out->event_id, sizeof out->event_id, "%s", cJSON_IsString(ev_id) ? ev_id->valuestring : "");
    rc = event_outbox_defer(db, events);
    cJSON_Delete(events);
    char notify[160];
    snprintf(notify, sizeof notify, "NOTIFY \"%s_outbox\"", cfg->prefix);
    if (rc == 0) rc = db_defer(db, notify, 0, NULL);
    if (rc == 0) rc = db_cmd(db, "COMMIT");
    if (rc == 0) out->outcome = PARKED_CANCELLED;
    return rc;
}

/* Not parked: what processed_commands says of id into out (already ran, or not found). 0 or an error class. */
static int look_up_processed(struct db *db, const char *id, struct parked_cancel *out) {
    const char *p[1] = {id};
    PGresult *r;
    int rc = db_exec(db, "SELECT type, outcome, " SQL_RFC3339("processed_at") " FROM processed_commands WHERE id = $1",
                     1, p, &r);
    if (rc < 0) return rc;
    out->outcome = PQntuples(r) ? PARKED_ALREADY_RAN : PARKED_NOT_FOUND;
    if (PQntuples(r)) {
        snprintf(out->type, sizeof out->type, "%s", PQgetvalue(r, 0, 0));
        snprintf(out->ran_outcome, sizeof out->ran_outcome, "%s", PQgetvalue(r, 0, 1));
        snprintf(out->processed_at, sizeof out->processed_at, "%s", PQgetvalue(r, 0, 2));
    }
    PQclear(r);
    return 0;
}

int parked_cancel(struct db *db, const struct cfg *cfg, const char *id, struct parked_cancel *out) {
    memset(out, 0, sizeof *out);
    const char *p[1] = {id};
    PGresult *del = NULL;
    int rc = db_cmd(db, "BEGIN");
    if (rc == 0) rc = db_defer(db, CANCEL_LOCK_TIMEOUT, 0, NULL);
    if (rc == 0)
        /* a command released to go next of its key (key_hold.c) passes the key on, cancelled */
        rc = db_exec(db, "WITH d AS (DELETE FROM parked_commands WHERE id = $1 RETURNING queue, type, envelope, "
                         "order_key) SELECT queue, type, envelope, CASE WHEN order_key IS NOT NULL THEN "
                         "conveyor_key_release(queue, ARRAY[order_key], ARRAY[$1::uuid]) END FROM d",
                     1, p, &del);
    if (rc == 0 && PQntuples(del) == 1) rc = settle_cancel(db, cfg, id, del, out);
    PQclear(del);
    if (out->outcome == PARKED_CANCELLED) return 0;
    if (db_ok(db)) (void)db_cmd(db, "ROLLBACK"); /* not parked, or done already: nothing changes */
    if (rc < 0 && rc != CV_EREJECT) return rc;
    return look_up_processed(db, id, out);
}
