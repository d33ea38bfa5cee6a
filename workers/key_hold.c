/* key_hold.c - order per key in an ordered queue (lanes with ordered = true;
 * docs/contract.md, section 10): a command that fails and is retried holds its
 * ordering key (table key_holds, sql/0012), and the later commands of that key
 * wait parked behind it (parked_commands, reason 'ordered', in order_seq
 * order) instead of overtaking it. When the holder is settled (applied,
 * rejected, a duplicate, or dead-lettered once out of attempts), the hold
 * passes to the first command parked behind it, which the timekeeper
 * publishes at once (conveyor_key_release). Commands of other keys, in its
 * lane or not, are never held. All of it in the batch's transaction (batch.c),
 * but the release for a command out of attempts, which never joins one.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The order key of it (lane_order_key), computed once and kept in it. */
static const char *key_of(const struct cfg_queue *q, struct batch_item *it) {
    if (!it->order_key_set) {
        lane_order_key(q, &it->env, it->order_key, sizeof it->order_key);
        it->order_key_set = true;
    }
    return it->order_key;
}

/* Parks the n items w behind their keys (deferred, in the open transaction):
 * parked_commands rows 'ordered', due never until a release, numbered in the
 * order of w (the order they arrived in, per key), and their dedup rows
 * removed. A row of the same id (a copy parked before) keeps its earlier
 * place. Returns 0 or an error class. */
static int park_behind(struct db *db, const struct cfg_queue *q, struct batch_item **w, int n) {
    const char **ids = xcalloc((size_t)n, sizeof *ids), **types = xcalloc((size_t)n, sizeof *types),
               **bodies = xcalloc((size_t)n, sizeof *bodies), **keys = xcalloc((size_t)n, sizeof *keys);
    for (int i = 0; i < n; i++) {
        ids[i] = w[i]->env.id;
        types[i] = w[i]->env.type;
        bodies[i] = xstrndup(w[i]->d.body, w[i]->d.len);
        keys[i] = w[i]->order_key;
    }
    char *a[4] = {db_array(ids, n), db_array(types, n), db_array(bodies, n), db_array(keys, n)};
    const char *p[5] = {a[0], a[1], a[2], a[3], q->name};
    int rc = db_defer(db,
                      "WITH w AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) "
                      "WITH ORDINALITY AS c(id, type, body, okey, ord)), "
                      "parked AS (INSERT INTO parked_commands (id, queue, type, due_at, envelope, reason, order_key, "
                      "order_seq) SELECT id, $5, type, 'infinity', body, 'ordered', okey, "
                      "nextval('parked_commands_order_seq') FROM (SELECT * FROM w ORDER BY ord) s "
                      "ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, due_at = excluded.due_at, "
                      "envelope = excluded.envelope, reason = excluded.reason, order_key = excluded.order_key, "
                      "rate_limit = NULL, order_seq = CASE WHEN parked_commands.reason = 'ordered' "
                      "THEN least(parked_commands.order_seq, excluded.order_seq) ELSE excluded.order_seq END) "
                      "DELETE FROM processed_commands WHERE id IN (SELECT id FROM w)",
                      5, p);
    for (int i = 0; i < 4; i++) free(a[i]);
    for (int i = 0; i < n; i++) free((char *)bodies[i]);
    free(ids);
    free(types);
    free(bodies);
    free(keys);
    return rc;
}

/* Marks it parked behind its key: not run, not claimed, acked once the
 * transaction commits (a duplicate's outcome, so that a token it took for a
 * rate limit goes back: rate_limit_refund_defer). */
static void mark_behind(struct batch_item *it) {
    it->parked = true;
    it->behind = true;
    it->rc = OUTCOME_DUPLICATE;
}

int key_hold_check(struct db *db, const struct cfg_queue *q, struct batch_item **v, int n) {
    if (!q->ordered || n == 0) return 0;
    const char **keys = xcalloc((size_t)n, sizeof *keys);
    int nk = 0;
    for (int i = 0; i < n; i++)
        if (v[i]->claimed && key_of(q, v[i])[0]) keys[nk++] = v[i]->order_key;
    if (nk == 0) {
        free(keys);
        return 0;
    }
    char *a = db_array(keys, nk);
    free(keys);
    const char *p[2] = {q->name, a};
    PGresult *r = NULL;
    /* locked until the transaction ends: a release or a new hold of these keys waits for it */
    int rc = db_exec(db, "SELECT order_key, command_id::text FROM key_holds WHERE queue = $1 "
                         "AND order_key = ANY($2::text[]) FOR UPDATE",
                     2, p, &r);
    free(a);
    if (rc < 0) return rc;
    struct batch_item **w = xcalloc((size_t)n, sizeof *w);
    int nw = 0;
    for (int i = 0; i < n; i++) {
        struct batch_item *it = v[i];
        if (!it->claimed || !it->order_key[0]) continue;
        for (int j = 0; j < PQntuples(r); j++) {
            if (strcmp(PQgetvalue(r, j, 0), it->order_key) != 0) continue;
            if (strcmp(PQgetvalue(r, j, 1), it->env.id) == 0) {
                it->holder = true; /* released to run next (or retried): it goes, and passes the key on */
            } else {
                w[nw++] = it;
                log_cmd(LOG_DEBUG, &it->env, "%s waits behind command %s of its key", it->env.type,
                        PQgetvalue(r, j, 1));
            }
            break;
        }
    }
    PQclear(r);
    rc = nw > 0 ? park_behind(db, q, w, nw) : 0;
    for (int i = 0; rc == 0 && i < nw; i++) mark_behind(w[i]);
    free(w);
    return rc < 0 ? rc : nw;
}

int key_hold_failed(const struct cfg_queue *q, struct batch_item **v, int i, int n) {
    if (!q->ordered || !key_of(q, v[i])[0]) return 0;
    if (!batch_will_retry(q, v[i])) {
        v[i]->dead_next = true; /* dead-lettered after the commit: the key passes on in it */
        return 0;
    }
    v[i]->will_hold = true;
    int marked = 0;
    for (int j = i + 1; j < n; j++)
        if (!v[j]->parked && v[j]->claimed && strcmp(key_of(q, v[j]), v[i]->order_key) == 0) {
            mark_behind(v[j]);
            log_cmd(LOG_DEBUG, &v[j]->env, "%s waits behind command %s of its key, which failed", v[j]->env.type,
                    v[i]->env.id);
            marked++;
        }
    return marked;
}

/* Defers conveyor_key_release for the items pick accepts. Returns 0 or an error class. */
static int release_defer(struct db *db, const struct cfg_queue *q, struct batch_item **v, int n,
                         bool (*pick)(const struct batch_item *), bool now) {
    const char **keys = xcalloc((size_t)(n ? n : 1), sizeof *keys), **ids = xcalloc((size_t)(n ? n : 1), sizeof *ids);
    int k = 0;
    for (int i = 0; i < n; i++)
        if (pick(v[i]) && key_of(q, v[i])[0]) {
            keys[k] = v[i]->order_key;
            ids[k++] = v[i]->env.id;
        }
    int rc = 0;
    if (k > 0) {
        char *ka = db_array(keys, k), *ia = db_array(ids, k);
        const char *p[3] = {q->name, ka, ia};
        const char *sql = "SELECT conveyor_key_release($1, $2::text[], $3::uuid[])";
        rc = now ? db_exec(db, sql, 3, p, NULL) : db_defer(db, sql, 3, p);
        free(ka);
        free(ia);
    }
    free(keys);
    free(ids);
    return rc;
}

static bool settled_holder(const struct batch_item *it) {
    return it->holder && !it->will_hold && (it->rc >= 0 || it->dead_next);
}
static bool exhausted(const struct batch_item *it) { return it->exhausted; }

int key_hold_settle_defer(struct db *db, const struct cfg_queue *q, struct batch_item **v, int n,
                          struct batch_item **behind, int nbehind) {
    if (!q->ordered) return 0;
    int rc = nbehind > 0 ? park_behind(db, q, behind, nbehind) : 0;
    const char **keys = xcalloc((size_t)(n ? n : 1), sizeof *keys), **ids = xcalloc((size_t)(n ? n : 1), sizeof *ids);
    int k = 0;
    for (int i = 0; i < n; i++)
        if (v[i]->will_hold && v[i]->rc < 0) {
            keys[k] = v[i]->order_key;
            ids[k++] = v[i]->env.id;
        }
    if (rc == 0 && k > 0) {
        char *ka = db_array(keys, k), *ia = db_array(ids, k);
        const char *p[3] = {q->name, ka, ia};
        /* the key is the failed command's until it is settled; it may hold it
         * already, or (a command of its key from another fairness key's lane,
         * which keeps no order with it) another may have taken it since the
         * check: then that one goes first */
        rc = db_defer(db, "INSERT INTO key_holds (queue, order_key, command_id) "
                          "SELECT $1, k, id FROM unnest($2::text[], $3::uuid[]) AS h(k, id) "
                          "ON CONFLICT (queue, order_key) DO NOTHING",
                      3, p);
        free(ka);
        free(ia);
    }
    free(keys);
    free(ids);
    if (rc == 0) rc = release_defer(db, q, v, n, settled_holder, false);
    return rc;
}

int key_hold_release_exhausted(struct db *db, const struct cfg_queue *q, struct batch_item **v, int n) {
    if (!q->ordered) return 0;
    return release_defer(db, q, v, n, exhausted, true);
}
