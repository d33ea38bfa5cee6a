/* dead_index.c - the index of RabbitMQ's dead letters in PostgreSQL
 * (sql/0007_dead_letter_index.sql), so that a page of them is a keyset query
 * and no letter is taken off its queue to be looked at.
 *
 * The queue conveyor.<queue>.dead is the truth; the index is a copy:
 *   - a worker writes a row right after the broker confirmed the letter
 *     (settle_dead), keyed by the letter's x-conveyor-dead-id header;
 *   - retry and purge take letters off the queue (the walk), then delete
 *     their rows (dead_index_forget);
 *   - every reader first compares the queue's message count (a passive
 *     declare) with the index's row count (dead_letter_index_count, kept by
 *     triggers); when they differ (a foreign tool took or added letters, a
 *     row write failed after the letter was written, a forget failed after a
 *     take) it rebuilds the queue's rows from the queue (dead_index_sync): a
 *     walk that takes nothing, so a rebuild costs each letter one redelivery,
 *     once per drift, never per look.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REBUILD_FLUSH 256 /* rows sent per round trip while rebuilding */
#define SETTLE_MS 200     /* a difference between the queue and the index that lasts this long is a drift */

/* The bytea literal of len bytes (\x and hex digits); the caller frees it. */
static char *bytea_hex(const char *body, size_t len) {
    static const char hex[] = "0123456789abcdef";
    char *s = xmalloc(2 * len + 3);
    s[0] = '\\';
    s[1] = 'x';
    for (size_t i = 0; i < len; i++) {
        s[2 + 2 * i] = hex[(unsigned char)body[i] >> 4];
        s[3 + 2 * i] = hex[(unsigned char)body[i] & 15];
    }
    s[2 * len + 2] = '\0';
    return s;
}

static const char insert_sql[] =
    "INSERT INTO dead_letter_index (queue, dead_id, key, message_id, reason, error, attempts, failed_at, body) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::bytea) ON CONFLICT (dead_id) DO NOTHING";

/* Sends (now, or deferred with defer) the row of d, a letter of q. Returns 0 or an error class. */
static int insert_row(struct db *db, const struct cfg_queue *q, const struct dead_letter *d, bool defer) {
    char key[DEAD_KEY_LEN + 1], attempts[16], dead_id[ID_LEN + 1];
    dead_letter_key(d, key);
    snprintf(attempts, sizeof attempts, "%d", d->attempts);
    bool has_id = d->dead_id && id_parse(d->dead_id, dead_id);
    char *body = bytea_hex(d->body, d->len);
    const char *p[9] = {q->name, has_id ? dead_id : NULL, key, d->message_id, d->reason ? d->reason : "",
                        d->error ? d->error : "", attempts, d->failed_at ? d->failed_at : "", body};
    int rc = defer ? db_defer(db, insert_sql, 9, p) : db_exec(db, insert_sql, 9, p, NULL);
    free(body);
    return rc;
}

int dead_index_add(struct db *db, const struct cfg_queue *q, const char *dead_id, const struct delivery *d,
                   const char *reason, const char *error, int attempts) {
    char at[32];
    clock_rfc3339(clock_ms(), at);
    struct dead_letter l = {.body = d->body, .len = d->len, .message_id = d->message_id, .reason = (char *)reason,
                            .error = (char *)error, .failed_at = at, .dead_id = (char *)dead_id, .attempts = attempts};
    return insert_row(db, q, &l, false);
}

int dead_index_forget(struct db *db, const struct cfg_queue *q, const struct dead_letter *d) {
    char dead_id[ID_LEN + 1];
    if (d->dead_id && id_parse(d->dead_id, dead_id)) {
        const char *p[1] = {dead_id};
        return db_exec(db, "DELETE FROM dead_letter_index WHERE dead_id = $1", 1, p, NULL);
    }
    char key[DEAD_KEY_LEN + 1];
    dead_letter_key(d, key);
    const char *p[2] = {q->name, key};
    return db_exec(db, "DELETE FROM dead_letter_index WHERE id = (SELECT id FROM dead_letter_index "
                       "WHERE queue = $1 AND key = $2 AND dead_id IS NULL ORDER BY id LIMIT 1)", 2, p, NULL);
}

/* The index's row count for q into *n (0 when it has none). */
static int index_count(struct db *db, const struct cfg_queue *q, long *n) {
    const char *p[1] = {q->name};
    PGresult *r;
    int rc = db_exec(db, "SELECT n FROM dead_letter_index_count WHERE queue = $1", 1, p, &r);
    if (rc < 0) return rc;
    *n = PQntuples(r) ? atol(PQgetvalue(r, 0, 0)) : 0;
    PQclear(r);
    return 0;
}

/* The rebuild's walk: each letter seen is written (deferred), none is taken. */
struct rebuild {
    struct db *db;
    const struct cfg_queue *q;
    int pending, rc;
    long rows;
};

static bool rebuild_row(const struct dead_letter *d, int index, void *arg) {
    (void)index;
    struct rebuild *r = arg;
    if (r->rc < 0) return false;
    if ((r->rc = insert_row(r->db, r->q, d, true)) == 0 && ++r->pending >= REBUILD_FLUSH) {
        r->rc = db_flush(r->db);
        r->pending = 0;
    }
    r->rows++;
    return false; /* taken: never */
}

/* Rebuilds q's rows from its queue in one transaction, under a lock per
 * queue (a second reader waits, then finds the counts equal). */
static int rebuild(struct db *db, struct broker *b, const struct cfg_queue *q, long *total, char *err, size_t errlen) {
    const char *p[1] = {q->name};
    int rc = db_cmd(db, "BEGIN");
    if (rc == 0) rc = db_exec(db, "SELECT pg_advisory_xact_lock(hashtext('conveyor.dead_index.' || $1))", 1, p, NULL);
    long indexed = -1;
    if (rc == 0 && (rc = broker_dead_count(b, q, total)) < 0) {
        snprintf(err, errlen, "cannot count the dead letters of %s: %s", q->name, broker_error(b));
        (void)db_cmd(db, "ROLLBACK");
        return rc;
    }
    if (rc == 0) rc = index_count(db, q, &indexed);
    if (rc == 0 && indexed == *total) return db_cmd(db, "COMMIT") < 0 ? db_err(db) : 0; /* another reader did it */
    if (rc == 0) rc = db_cmd(db, "SET LOCAL conveyor.dead_index_rebuild TO on");
    if (rc == 0) rc = db_exec(db, "DELETE FROM dead_letter_index WHERE queue = $1", 1, p, NULL);
    struct rebuild r = {.db = db, .q = q};
    if (rc == 0) {
        int count = 0, brc = broker_dead_take(b, q, rebuild_row, &r, false, &count);
        if (brc < 0) {
            snprintf(err, errlen, "cannot read the dead letters of %s: %s", q->name, broker_error(b));
            db_discard(db);
            (void)db_cmd(db, "ROLLBACK");
            return brc;
        }
        rc = r.rc < 0 ? r.rc : db_flush(db);
    }
    if (rc == 0)
        rc = db_exec(db, "INSERT INTO dead_letter_index_count (queue, n) SELECT $1, count(*) FROM dead_letter_index "
                         "WHERE queue = $1 ON CONFLICT (queue) DO UPDATE SET n = EXCLUDED.n", 1, p, NULL);
    if (rc == 0) rc = db_cmd(db, "COMMIT");
    if (rc < 0) {
        snprintf(err, errlen, "cannot rebuild the dead-letter index of %s: %s", q->name, db_errstr(db));
        db_discard(db);
        (void)db_cmd(db, "ROLLBACK");
        return rc;
    }
    log_info("dead-letter index of %s rebuilt from its queue: %ld letter%s (it had %ld rows)", q->name, r.rows,
             r.rows == 1 ? "" : "s", indexed);
    return 1;
}

int dead_index_sync(struct db *db, struct broker *b, const struct cfg_queue *q, long *total, char *err,
                    size_t errlen) {
    long indexed = 0, seen_total = -1, seen_indexed = -1;
    for (int look = 0;; look++) {
        int rc = broker_dead_count(b, q, total);
        if (rc < 0) {
            snprintf(err, errlen, "cannot count the dead letters of %s: %s", q->name, broker_error(b));
            return rc;
        }
        if ((rc = index_count(db, q, &indexed)) < 0) {
            snprintf(err, errlen, "cannot read the dead-letter index of %s: %s%s", q->name, db_errstr(db),
                     strcmp(db_sqlstate(db), "42P01") == 0 ? " (the schema is older: run conveyor-workers --setup)" : "");
            return rc;
        }
        if (indexed == *total) return 0;
        /* A worker writes its row just after the broker has the letter: fewer rows
         * than letters, and moving, is letters coming in (read the index as it
         * is); a difference that stays the same over SETTLE_MS, or rows for
         * letters the queue no longer has, is a drift (rebuild). */
        if (look > 0 && indexed < *total && (*total != seen_total || indexed != seen_indexed)) return 0;
        if (look > 0) return rebuild(db, b, q, total, err, errlen);
        seen_total = *total;
        seen_indexed = indexed;
        struct timespec ts = {0, SETTLE_MS * 1000000L};
        nanosleep(&ts, NULL);
    }
}

/* Row i of r (columns id, dead_id, message_id, reason, error, attempts,
 * failed_at, body, number) into *d, and its id and number. */
static void row_of(const PGresult *r, int i, struct dead_letter *d, long long *id, long *number) {
    memset(d, 0, sizeof *d);
    *id = atoll(PQgetvalue(r, i, 0));
    if (!PQgetisnull(r, i, 1)) d->dead_id = xstrdup(PQgetvalue(r, i, 1));
    if (!PQgetisnull(r, i, 2)) d->message_id = xstrdup(PQgetvalue(r, i, 2));
    d->reason = xstrdup(PQgetvalue(r, i, 3));
    d->error = xstrdup(PQgetvalue(r, i, 4));
    d->attempts = atoi(PQgetvalue(r, i, 5));
    d->failed_at = xstrdup(PQgetvalue(r, i, 6));
    size_t len = 0;
    unsigned char *raw = PQunescapeBytea((const unsigned char *)PQgetvalue(r, i, 7), &len);
    d->body = xmalloc(len + 1);
    if (raw && len) memcpy(d->body, raw, len);
    d->body[raw ? len : 0] = '\0';
    d->len = raw ? len : 0;
    PQfreemem(raw);
    *number = atol(PQgetvalue(r, i, 8));
}

/* Runs a query of the columns row_of reads and fills *out, ids, numbers, *n. */
static int rows(struct db *db, const char *sql, int np, const char *const *p, struct dead_letter **out,
                long long **ids, long **numbers, int *n) {
    PGresult *r;
    int rc = db_exec(db, sql, np, p, &r);
    *out = NULL;
    *ids = NULL;
    *numbers = NULL;
    *n = 0;
    if (rc < 0) return rc;
    int k = PQntuples(r);
    *out = xcalloc(k ? (size_t)k : 1, sizeof **out);
    *ids = xcalloc(k ? (size_t)k : 1, sizeof **ids);
    *numbers = xcalloc(k ? (size_t)k : 1, sizeof **numbers);
    for (int i = 0; i < k; i++) row_of(r, i, &(*out)[i], &(*ids)[i], &(*numbers)[i]);
    *n = k;
    PQclear(r);
    return 0;
}

#define COLUMNS "id, dead_id, message_id, reason, error, attempts, failed_at, body"

int dead_index_page(struct db *db, const struct cfg_queue *q, long long after_id, long offset, int limit,
                    struct dead_letter **out, long long **ids, int *n) {
    char after[24], off[24], lim[16];
    snprintf(after, sizeof after, "%lld", after_id);
    snprintf(off, sizeof off, "%ld", offset);
    snprintf(lim, sizeof lim, "%d", limit);
    const char *p[4] = {q->name, after, off, lim};
    long *numbers;
    /* a keyset page: by the (queue, id) index, whatever the rows after it */
    int rc = rows(db, "SELECT " COLUMNS ", 0 FROM dead_letter_index WHERE queue = $1 AND id > $2 "
                      "ORDER BY id OFFSET $3 LIMIT $4", 4, p, out, ids, &numbers, n);
    free(numbers);
    return rc;
}

int dead_index_find(struct db *db, const struct cfg_queue *q, const char *key, struct dead_letter **out,
                    long **numbers, int *n) {
    const char *p[2] = {q->name, key};
    long long *ids;
    int rc = rows(db, "SELECT " COLUMNS ", (SELECT count(*) FROM dead_letter_index o WHERE o.queue = i.queue "
                      "AND o.id <= i.id) FROM dead_letter_index i WHERE queue = $1 AND key = $2 ORDER BY id",
                  2, p, out, &ids, numbers, n);
    free(ids);
    return rc;
}

/* dead_index_take's selector: the caller's, and a copy of what it chose. */
struct taking {
    dead_select_fn sel;
    void *arg;
    struct dead_letter *chosen;
    int n, cap;
};

static bool take_and_note(const struct dead_letter *d, int index, void *arg) {
    struct taking *t = arg;
    if (!t->sel(d, index, t->arg)) return false;
    if (t->n == t->cap) t->chosen = xrealloc(t->chosen, (size_t)(t->cap = t->cap ? 2 * t->cap : 8) * sizeof *t->chosen);
    struct dead_letter *c = &t->chosen[t->n++];
    memset(c, 0, sizeof *c);
    c->body = xmalloc(d->len + 1);
    memcpy(c->body, d->body, d->len + 1);
    c->len = d->len;
    c->message_id = d->message_id ? xstrdup(d->message_id) : NULL;
    c->dead_id = d->dead_id ? xstrdup(d->dead_id) : NULL;
    return true;
}

int dead_index_take(struct broker *b, struct db *db, const struct cfg_queue *q, dead_select_fn sel, void *arg,
                    bool requeue, int *count) {
    if (q->transport != TRANSPORT_RABBITMQ || !db) return broker_dead_take(b, q, sel, arg, requeue, count);
    struct taking t = {.sel = sel, .arg = arg};
    int rc = broker_dead_take(b, q, take_and_note, &t, requeue, count);
    /* the letters are off the queue: their rows go (a failure here, or a chosen
     * letter the walk then could not take, is a drift the next reader repairs) */
    for (int i = 0; i < t.n; i++)
        if (dead_index_forget(db, q, &t.chosen[i]) < 0) {
            log_warn("dead-letter index of %s: a row of a taken letter stays (%s); the next reader rebuilds it",
                     q->name, db_errstr(db));
            break;
        }
    dead_letters_free(t.chosen, t.n);
    return rc;
}
