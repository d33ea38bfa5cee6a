/* rate_limit.c - rate limits counted on committed work (queues.conf's
 * rate_limits; sql/0011 holds the buckets and conveyor_rate_take). Inside the
 * batch's transaction, after its dedup rows are claimed and before any
 * handler runs, each claimed command of a limited type takes one token of its
 * limit's bucket (one per value of the limit's key), one statement per bucket
 * in a fixed order (limit name, then bucket), all in one round trip. The rows
 * debited stay locked until the transaction ends, so:
 *   - a rollback (a crash, a lost connection, a batch undone) gives the
 *     tokens back by itself;
 *   - a command that did no work (its handler rejected it, or it failed and
 *     is retried) gives its token back before the COMMIT (rate_limit_refund_defer);
 *   - a command left without a token is parked in parked_commands until its
 *     place in the bucket's waiting line (over = "wait": no attempt spent,
 *     its dedup row removed, its message acked after the COMMIT), or rejected
 *     RATE_LIMITED with retryAfterMs (over = "reject": the batch runs its
 *     rejection instead of its handler).
 * Tokens and the waiting line are judged by the database's clock.
 */
#include "workers.h"

#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The key's value in a payload: the field at path ("a.b") as text (a string
 * as is, a number or boolean as JSON), "" when absent, null or an object or
 * array (those share one bucket); a value over 128 bytes is its hash
 * ("h:" and 32 hex digits). Into out (RATE_BUCKET_MAX bytes). */
static void bucket_of(const cJSON *payload, const char *path, char out[RATE_BUCKET_MAX]) {
    out[0] = '\0';
    const cJSON *v = payload;
    char part[200];
    for (const char *p = path; v && *p;) {
        size_t len = strcspn(p, ".");
        snprintf(part, sizeof part, "%.*s", (int)len, p);
        v = cJSON_IsObject(v) ? cJSON_GetObjectItemCaseSensitive(v, part) : NULL;
        p += len + (p[len] == '.');
    }
    char *text = NULL;
    if (v && cJSON_IsString(v) && v->valuestring) text = xstrdup(v->valuestring);
    else if (v && (cJSON_IsNumber(v) || cJSON_IsBool(v))) text = cJSON_PrintUnformatted(v);
    if (!text) return;
    size_t len = strlen(text);
    if (len <= 128) {
        memcpy(out, text, len + 1);
    } else {
        unsigned char h[16];
        crypto_generichash(h, sizeof h, (const unsigned char *)text, len, NULL, 0);
        memcpy(out, "h:", 2);
        sodium_bin2hex(out + 2, RATE_BUCKET_MAX - 2, h, sizeof h);
    }
    free(text);
}

void rate_limit_bind(const struct cfg *cfg, struct batch_item *it) {
    it->limit = cfg_rate_limit_for(cfg, it->env.type);
    it->token_shard = -1;
    if (it->limit && it->limit->key) bucket_of(it->env.payload, it->limit->key, it->bucket);
    else it->bucket[0] = '\0';
}

void rate_limit_forget(struct batch_item *it) {
    it->token_shard = -1;
    it->limit_rejected = false;
    it->later_ms = 0;
}

/* Whether it takes a token: claimed in this transaction, limited, and not
 * rejected by the envelope's rules before any work. */
static bool wants_token(const struct batch_item *it) {
    return it->limit && it->claimed && !it->env.field_errors && !it->env.has_nul;
}

/* qsort order of items by (limit name, bucket): every transaction takes its
 * bucket rows in one order, so two never wait for each other's. */
static int by_bucket(const void *a, const void *b) {
    const struct batch_item *x = *(struct batch_item *const *)a, *y = *(struct batch_item *const *)b;
    int c = strcmp(x->limit->name, y->limit->name);
    return c ? c : strcmp(x->bucket, y->bucket);
}

/* Parks the n waiters w (over = "wait", later_ms set) in parked_commands for
 * queue q, due later_ms from now by the database's clock, and removes their
 * dedup rows, inside the open transaction (deferred). A row of the same id
 * may still be there: the timekeeper that released this very message holds it
 * until its DELETE commits. The upsert waits for that lock (DO NOTHING would
 * not, and the timekeeper's DELETE would then remove the new parking: a lost
 * command), and inserts anew once the row is gone. Returns 0 or an error class. */
static int park_waiters(struct db *db, const struct cfg_queue *q, struct batch_item **w, int n) {
    const char **ids = xcalloc((size_t)n, sizeof *ids), **types = xcalloc((size_t)n, sizeof *types),
               **laters = xcalloc((size_t)n, sizeof *laters), **bodies = xcalloc((size_t)n, sizeof *bodies),
               **limits = xcalloc((size_t)n, sizeof *limits);
    char (*later_text)[24] = xcalloc((size_t)n, sizeof *later_text);
    for (int i = 0; i < n; i++) {
        snprintf(later_text[i], sizeof later_text[i], "%lld", (long long)w[i]->later_ms);
        ids[i] = w[i]->env.id;
        types[i] = w[i]->env.type;
        laters[i] = later_text[i];
        bodies[i] = xstrndup(w[i]->d.body, w[i]->d.len);
        limits[i] = w[i]->limit->name;
    }
    char *a[5] = {db_array(ids, n), db_array(types, n), db_array(laters, n), db_array(bodies, n),
                  db_array(limits, n)};
    const char *p[6] = {a[0], a[1], a[2], a[3], a[4], q->name};
    int rc = db_defer(db,
                      "WITH w AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[]) "
                      "AS c(id, type, later_ms, body, rate_limit)), "
                      "parked AS (INSERT INTO parked_commands (id, queue, type, due_at, envelope, reason, rate_limit) "
                      "SELECT id, $6, type, clock_timestamp() + make_interval(secs => later_ms / 1000.0), body, "
                      "'rate_limited', rate_limit FROM w ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, "
                      "due_at = excluded.due_at, envelope = excluded.envelope, reason = excluded.reason, "
                      "rate_limit = excluded.rate_limit) "
                      "DELETE FROM processed_commands WHERE id IN (SELECT id FROM w)",
                      6, p);
    for (int i = 0; i < 5; i++) free(a[i]);
    for (int i = 0; i < n; i++) free((char *)bodies[i]);
    free(ids);
    free(types);
    free(laters);
    free(bodies);
    free(limits);
    free(later_text);
    return rc;
}

/* Reads one bucket's conveyor_rate_take result r for its items g[0..m): the
 * first ones get the tokens (their shards), the others a later_ms each (and
 * are waiters or rejected). Returns false when r is not what the function
 * returns (a bug). */
static bool apply_take(PGresult *r, struct batch_item **g, int m) {
    if (!r || PQntuples(r) != 1) return false;
    /* int[] and bigint[] come as {1,2,3}: read them as the JSON arrays [1,2,3] */
    char *gtext = xstrdup(PQgetvalue(r, 0, 0)), *ltext = xstrdup(PQgetvalue(r, 0, 1));
    gtext[0] = '[', gtext[strlen(gtext) - 1] = ']';
    ltext[0] = '[', ltext[strlen(ltext) - 1] = ']';
    cJSON *granted = cJSON_Parse(gtext), *later = cJSON_Parse(ltext);
    free(gtext);
    free(ltext);
    int ng = cJSON_GetArraySize(granted), nl = cJSON_GetArraySize(later);
    bool ok = cJSON_IsArray(granted) && cJSON_IsArray(later) && ng + nl == m;
    for (int i = 0; ok && i < m; i++) {
        if (i < ng) {
            g[i]->token_shard = cJSON_GetArrayItem(granted, i)->valueint;
        } else {
            g[i]->later_ms = (int64_t)cJSON_GetArrayItem(later, i - ng)->valuedouble;
            if (g[i]->limit->over == RATE_OVER_REJECT) g[i]->limit_rejected = true;
            else g[i]->parked = true;
        }
    }
    cJSON_Delete(granted);
    cJSON_Delete(later);
    return ok;
}

int rate_limit_take(struct db *db, const struct cfg_queue *q, struct batch_item **v, int n) {
    struct batch_item **t = xmalloc((size_t)(n ? n : 1) * sizeof *t);
    int nt = 0;
    for (int i = 0; i < n; i++)
        if (wants_token(v[i])) t[nt++] = v[i];
    if (nt == 0) {
        free(t);
        return 0;
    }
    qsort(t, (size_t)nt, sizeof *t, by_bucket); /* stable enough: one bucket's items keep no order to keep */
    int *handle = xmalloc((size_t)nt * sizeof *handle), *start = xmalloc((size_t)nt * sizeof *start);
    int ngroups = 0, rc = 0;
    for (int i = 0; i < nt && rc == 0; i++) {
        if (i > 0 && by_bucket(&t[i - 1], &t[i]) == 0) continue;
        int m = 1;
        while (i + m < nt && by_bucket(&t[i], &t[i + m]) == 0) m++;
        const struct cfg_rate_limit *rl = t[i]->limit;
        char shards[16], first[16], rate[40], burst[40], need[16];
        snprintf(shards, sizeof shards, "%d", rl->shards);
        snprintf(first, sizeof first, "%u", randombytes_uniform((uint32_t)rl->shards));
        snprintf(rate, sizeof rate, "%.17g", rl->rate);
        snprintf(burst, sizeof burst, "%.17g", rl->burst);
        snprintf(need, sizeof need, "%d", m);
        const char *p[8] = {rl->name, t[i]->bucket, shards, first, rate, burst, need,
                            rl->over == RATE_OVER_WAIT ? "wait" : "reject"};
        rc = db_defer_result(db, "SELECT granted, later_ms FROM conveyor_rate_take($1, $2, $3::int, $4::int, "
                                 "$5::float8, $6::float8, $7::int, $8)", 8, p);
        if (rc >= 0) {
            start[ngroups] = i;
            handle[ngroups++] = rc;
            rc = 0;
        }
    }
    if (rc == 0) rc = db_flush(db);
    for (int k = 0; k < ngroups; k++) { /* every handle is taken, also after a failure */
        PGresult *r = NULL;
        int trc = db_take_result(db, handle[k], &r);
        int end = k + 1 < ngroups ? start[k + 1] : nt;
        if (rc == 0 && trc < 0) rc = trc;
        if (rc == 0 && !apply_take(r, &t[start[k]], end - start[k])) rc = CV_EREFUSED;
        PQclear(r);
    }
    int parked = 0;
    for (int i = 0; i < nt; i++)
        if (t[i]->parked) t[parked++] = t[i];
    if (rc == 0 && parked > 0) rc = park_waiters(db, q, t, parked);
    for (int i = 0; rc < 0 && i < parked; i++) t[i]->parked = false; /* the transaction is to be undone */
    for (int i = 0; rc == 0 && i < parked; i++) {
        t[i]->claimed = false;
        log_cmd(LOG_DEBUG, &t[i]->env, "%s waits %lld ms for a token of rate limit %s", t[i]->env.type,
                (long long)t[i]->later_ms, t[i]->limit->name);
    }
    free(handle);
    free(start);
    free(t);
    return rc < 0 ? rc : parked;
}

int rate_limit_refund_defer(struct db *db, struct batch_item **v, int n) {
    bool any = false; /* the common case, no limit at all: nothing to allocate */
    for (int i = 0; i < n && !any; i++) any = v[i]->token_shard >= 0;
    if (!any) return 0;
    const char **names = xcalloc((size_t)n, sizeof *names), **buckets = xcalloc((size_t)n, sizeof *buckets),
               **shards = xcalloc((size_t)n, sizeof *shards), **sizes = xcalloc((size_t)n, sizeof *sizes);
    char (*shard_text)[16] = xcalloc((size_t)n, sizeof *shard_text);
    char (*size_text)[40] = xcalloc((size_t)n, sizeof *size_text);
    int k = 0, rc = 0;
    for (int i = 0; i < n; i++) {
        const struct batch_item *it = v[i];
        if (it->token_shard < 0 || (it->rc >= 0 && it->rc != OUTCOME_REJECTED && it->rc != OUTCOME_DUPLICATE)) continue;
        snprintf(shard_text[k], sizeof shard_text[k], "%d", it->token_shard);
        snprintf(size_text[k], sizeof size_text[k], "%.17g", it->limit->burst / it->limit->shards);
        names[k] = it->limit->name;
        buckets[k] = it->bucket;
        shards[k] = shard_text[k];
        sizes[k] = size_text[k];
        k++;
    }
    if (k > 0) {
        char *a[4] = {db_array(names, k), db_array(buckets, k), db_array(shards, k), db_array(sizes, k)};
        const char *p[4] = {a[0], a[1], a[2], a[3]};
        /* one token back per command, to the row it came from (locked by this transaction) */
        rc = db_defer(db, "SELECT conveyor_rate_refund(l, b, s, size, count(*)::int) "
                          "FROM unnest($1::text[], $2::text[], $3::int[], $4::float8[]) AS x(l, b, s, size) "
                          "GROUP BY l, b, s, size",
                      4, p);
        for (int i = 0; i < 4; i++) free(a[i]);
    }
    free(names);
    free(buckets);
    free(shards);
    free(sizes);
    free(shard_text);
    free(size_text);
    return rc;
}
