/* parking.c - where a command waits for its time: the table parked_commands
 * (sql/0010). A worker parks a command it took before its notBefore
 * (parking_park) and acks it: no delivery held, no attempt spent. The active
 * timekeeper (timekeeper.c) publishes the rows that are due back to their
 * queue (parking_release), and a worker then applies them. Both judge time by
 * the database's clock (now()), never a host's. docs/decisions.md, "Where
 * commands wait".
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ms of an RFC 3339 time (clock_rfc3339_ms: the fraction cut to ms) rounded
 * up when the fraction goes on past ms: a command is never due before its
 * notBefore, not even by a microsecond. */
static int64_t due_ms_ceil(const char *s, int64_t ms) {
    const char *f = strchr(s, '.');
    for (int i = 1; f && f[i] >= '0' && f[i] <= '9'; i++)
        if (i > 3 && f[i] != '0') return ms + 1;
    return ms;
}

int parking_park(struct db *db, const struct cfg_queue *q, struct batch_item **v, int n) {
    const char **ids = xcalloc((size_t)n, sizeof *ids), **types = xcalloc((size_t)n, sizeof *types);
    const char **dues = xcalloc((size_t)n, sizeof *dues), **bodies = xcalloc((size_t)n, sizeof *bodies);
    char (*due_text)[24] = xcalloc((size_t)n, sizeof *due_text);
    char **copies = xcalloc((size_t)n, sizeof *copies);
    int k = 0;
    for (int i = 0; i < n; i++) {
        const struct envelope *e = &v[i]->env;
        int64_t ms;
        /* an invalid notBefore is rejected by the batch (VALIDATION_FAILED), like any field */
        if (!e->not_before || e->field_errors || e->has_nul || !clock_rfc3339_ms(e->not_before, &ms)) continue;
        snprintf(due_text[k], sizeof due_text[k], "%lld", (long long)due_ms_ceil(e->not_before, ms));
        copies[k] = xstrndup(v[i]->d.body, v[i]->d.len); /* the body as taken (a NUL byte was dead-lettered) */
        ids[k] = e->id;
        types[k] = e->type;
        dues[k] = due_text[k];
        bodies[k] = copies[k];
        k++;
    }
    int parked = 0;
    if (k > 0) {
        char *a_ids = db_array(ids, k), *a_types = db_array(types, k), *a_dues = db_array(dues, k),
             *a_bodies = db_array(bodies, k);
        const char *p[5] = {a_ids, a_types, a_dues, a_bodies, q->name};
        PGresult *r = NULL;
        /* one statement, one transaction: every command not due yet by the
         * database's clock is parked (once: a copy of one parked already finds
         * its row), and named, so the caller acks it; one processed already (a
         * copy of one applied or cancelled) is not: the batch finds it a duplicate */
        int rc = db_exec(db,
                         "WITH later AS (SELECT c.id, c.type, to_timestamp(c.due_ms / 1000.0) AS due_at, c.body "
                         "FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[]) AS c(id, type, due_ms, body) "
                         "WHERE to_timestamp(c.due_ms / 1000.0) > now() "
                         "AND NOT EXISTS (SELECT 1 FROM processed_commands d WHERE d.id = c.id)), "
                         "parked AS (INSERT INTO parked_commands (id, queue, type, due_at, envelope, reason) "
                         "SELECT DISTINCT ON (id) id, $5, type, due_at, body, 'delayed' FROM later ORDER BY id "
                         "ON CONFLICT (id) DO NOTHING) "
                         "SELECT id::text FROM later",
                         5, p, &r);
        free(a_ids);
        free(a_types);
        free(a_dues);
        free(a_bodies);
        if (rc < 0) parked = rc;
        for (int j = 0; rc == 0 && j < PQntuples(r); j++)
            for (int i = 0; i < n; i++)
                if (!v[i]->parked && strcmp(v[i]->env.id, PQgetvalue(r, j, 0)) == 0) {
                    v[i]->parked = true;
                    log_cmd(LOG_DEBUG, &v[i]->env, "parked until %s", v[i]->env.not_before);
                    parked++;
                }
        PQclear(r);
    }
    for (int i = 0; i < k; i++) free(copies[i]);
    free(copies);
    free(due_text);
    free(ids);
    free(types);
    free(dues);
    free(bodies);
    return parked;
}

/* The queue a due row goes back to: its own while the configuration still
 * has it and it still takes the type, else the queue that now routes the
 * type; NULL when none does. */
static const struct cfg_queue *release_queue(const struct cfg *cfg, const char *queue, const char *type) {
    const struct cfg_queue *q = cfg_queue_named(cfg, queue);
    return q && cfg_queue_for(cfg, type) == q ? q : cfg_queue_for(cfg, type);
}

/* Publishes the rows of r (id, queue, type, envelope) that have a queue, those
 * of transport t, through brokers[t] (opened when NULL). Returns how many were
 * sent, or the class of the failure (brokers[t] then closed and NULL) with why
 * in err; refused[i] (one per row of r) is set for a row a full bounded queue
 * refused (CV_EFULL is no failure here: the others went, *full says so). */
static int release_send(const struct cfg *cfg, struct broker *brokers[2], enum transport t, PGresult *r,
                        bool *refused, bool *full, char *err, size_t errlen) {
    int n = PQntuples(r), k = 0;
    struct outgoing_command *oc = xcalloc((size_t)(n ? n : 1), sizeof *oc);
    for (int i = 0; i < n; i++) {
        const struct cfg_queue *q = release_queue(cfg, PQgetvalue(r, i, 1), PQgetvalue(r, i, 2));
        if (!q || q->transport != t) continue;
        oc[k++] = (struct outgoing_command){q, PQgetvalue(r, i, 2), PQgetvalue(r, i, 3),
                                            (size_t)PQgetlength(r, i, 3), PQgetvalue(r, i, 0), &refused[i]};
    }
    int rc = 0, cls = 0;
    if (k > 0 && !brokers[t] && !(brokers[t] = broker_open_class(cfg, t, &cls, err, errlen))) rc = cls ? cls : CV_ERETRY;
    if (k > 0 && rc == 0 && (rc = broker_publish_commands(brokers[t], oc, k)) < 0) {
        snprintf(err, errlen, "%s", broker_error(brokers[t]));
        if (rc == CV_EFULL) { /* refused, not lost: the connection is fine */
            *full = true;
            for (int j = 0, sent = k; j < sent; j++) k -= *oc[j].refused;
            rc = 0;
        } else {
            broker_close(brokers[t]);
            brokers[t] = NULL;
        }
    }
    free(oc);
    return rc < 0 ? rc : k;
}

/* The command types some queue of cfg routes, as a PostgreSQL array literal (malloc'd). */
static char *routed_types(const struct cfg *cfg) {
    int n = 0;
    for (int i = 0; i < cfg->nqueues; i++) n += cfg->queues[i].ncommands;
    const char **v = xcalloc((size_t)(n ? n : 1), sizeof *v);
    int k = 0;
    for (int i = 0; i < cfg->nqueues; i++)
        for (int j = 0; j < cfg->queues[i].ncommands; j++) v[k++] = cfg->queues[i].commands[j];
    char *a = db_array(v, k);
    free(v);
    return a;
}

int parking_release(struct db *db, const struct cfg *cfg, struct broker *brokers[2], int batch, char *err,
                    size_t errlen) {
    char limit[16];
    snprintf(limit, sizeof limit, "%d", batch);
    PGresult *r = NULL;
    err[0] = '\0';
    if (db_cmd(db, "BEGIN") < 0) return db_err(db);
    char *types = routed_types(cfg);
    const char *p[2] = {limit, types};
    /* locked until the broker confirmed them and their delete commits: a
     * cancel (conveyor-admin scheduled cancel) waits for that, then finds
     * nothing to cancel; or it came first, and the claim skips the row.
     * Ordered by due_at alone: the index parked_commands_due yields the first
     * `batch` rows and the scan stops there, however many fall due at once (a
     * tie-breaker would make it read and sort every due row on each pass:
     * docs/performance.md, "Delayed commands and schedules"). A type no queue
     * routes any more stays parked (seen in scheduled list) and is not
     * claimed: it would hold up the rows behind it */
    int rc = db_exec(db, "SELECT id::text, queue, type, envelope FROM parked_commands WHERE due_at <= now() "
                         "AND type = ANY($2::text[]) ORDER BY due_at LIMIT $1::int FOR UPDATE SKIP LOCKED",
                     2, p, &r);
    free(types);
    int sent = 0;
    bool full = false, *refused = xcalloc(rc == 0 && PQntuples(r) ? (size_t)PQntuples(r) : 1, sizeof *refused);
    for (int t = 0; rc == 0 && t < 2; t++) {
        int n = release_send(cfg, brokers, (enum transport)t, r, refused, &full, err, errlen);
        if (n < 0) rc = n;
        else sent += n;
    }
    if (rc == 0 && sent > 0) { /* a row a full queue refused stays parked, for a later pass */
        const char **ids = xcalloc((size_t)PQntuples(r), sizeof *ids);
        int k = 0;
        for (int i = 0; i < PQntuples(r); i++)
            if (!refused[i] && release_queue(cfg, PQgetvalue(r, i, 1), PQgetvalue(r, i, 2))) ids[k++] = PQgetvalue(r, i, 0);
        char *a = db_array(ids, k);
        const char *dp[1] = {a};
        rc = db_exec(db, "DELETE FROM parked_commands WHERE id = ANY($1::uuid[])", 1, dp, NULL);
        free(a);
        free(ids);
    }
    if (rc == 0) rc = db_cmd(db, "COMMIT");
    else (void)db_cmd(db, "ROLLBACK"); /* fails only with the connection, which rolls back too */
    if (rc < 0 && !err[0]) snprintf(err, errlen, "%s", db_errstr(db));
    PQclear(r);
    free(refused);
    /* published but not deleted (a failed COMMIT): published again later, and
     * the copy is absorbed by the command's dedup row */
    return rc < 0 ? rc : full ? CV_EFULL : sent;
}
