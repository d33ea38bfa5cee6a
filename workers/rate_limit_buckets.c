/* rate_limit_buckets.c - the rate limits' buckets seen from outside a
 * transaction: their state for the operator (conveyor-admin stats, /metrics,
 * the dashboard) and the pruning of a keyed limit's idle buckets by the active
 * timekeeper. The buckets are sql/0011's rate_limit_buckets; rate_limit.c
 * takes and gives back their tokens. */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The arrays of cfg's limits (names, rates, bursts, shards, keyed) as
 * PostgreSQL array literals into a[0..4] (the caller frees each). */
static void limit_arrays(const struct cfg *cfg, char *a[5]) {
    int n = cfg->nrate_limits;
    const char **cols[5];
    char (*text)[4][40] = xcalloc((size_t)(n ? n : 1), sizeof *text);
    for (int c = 0; c < 5; c++) cols[c] = xcalloc((size_t)(n ? n : 1), sizeof *cols[c]);
    for (int i = 0; i < n; i++) {
        const struct cfg_rate_limit *rl = &cfg->rate_limits[i];
        snprintf(text[i][0], sizeof text[i][0], "%.17g", rl->rate);
        snprintf(text[i][1], sizeof text[i][1], "%.17g", rl->burst);
        snprintf(text[i][2], sizeof text[i][2], "%d", rl->shards);
        snprintf(text[i][3], sizeof text[i][3], "%s", rl->key ? "true" : "false");
        cols[0][i] = rl->name;
        for (int c = 1; c < 5; c++) cols[c][i] = text[i][c - 1];
    }
    for (int c = 0; c < 5; c++) {
        a[c] = db_array(cols[c], n);
        free(cols[c]);
    }
    free(text);
}

/* Runs sql with cfg's limits as its parameters $1..$5 (limit_arrays). Returns
 * db_exec's: 0 with *r (the caller PQclear()s it), or an error class. */
static int limits_exec(struct db *db, const struct cfg *cfg, const char *sql, PGresult **r) {
    char *a[5];
    limit_arrays(cfg, a);
    const char *p[5] = {a[0], a[1], a[2], a[3], a[4]};
    int rc = db_exec(db, sql, 5, p, r);
    for (int c = 0; c < 5; c++) free(a[c]);
    return rc;
}

int rate_limit_states_read(struct db *db, const struct cfg *cfg, struct rate_limit_state *out) {
    for (int i = 0; i < cfg->nrate_limits; i++) /* waiting is rate_limit_waiting_read's */
        out[i] = (struct rate_limit_state){.rl = &cfg->rate_limits[i], .tokens = cfg->rate_limits[i].burst,
                                           .waiting = out[i].waiting};
    if (cfg->nrate_limits == 0) return 0;
    PGresult *r = NULL;
    /* a bucket's tokens now: its rows refilled to now, each capped at its size;
     * a keyed limit shows its emptiest bucket (a key never seen is full) */
    int rc = limits_exec(db, cfg,
                     "WITH l AS (SELECT * FROM unnest($1::text[], $2::float8[], $3::float8[], $4::int[], $5::bool[]) "
                     "AS l(name, rate, burst, shards, keyed)), "
                     "b AS (SELECT r.limit_name, r.bucket, sum(least(l.burst / l.shards, r.tokens + l.rate / l.shards "
                     "* greatest(0, extract(epoch FROM clock_timestamp() - r.refilled_at)))) AS tokens "
                     "FROM rate_limit_buckets r JOIN l ON l.name = r.limit_name AND r.shard BETWEEN 0 AND l.shards - 1 "
                     "GROUP BY r.limit_name, r.bucket) "
                     "SELECT l.name, coalesce((SELECT min(b.tokens) FROM b WHERE b.limit_name = l.name), l.burst), "
                     "(SELECT count(*) FROM b WHERE b.limit_name = l.name), "
                     "(SELECT coalesce(sum(r.waited), 0) FROM rate_limit_buckets r WHERE r.limit_name = l.name), "
                     "(SELECT coalesce(sum(r.rejected), 0) FROM rate_limit_buckets r WHERE r.limit_name = l.name) "
                     "FROM l",
                     &r);
    if (rc < 0) return rc;
    for (int j = 0; j < PQntuples(r); j++)
        for (int i = 0; i < cfg->nrate_limits; i++)
            if (strcmp(cfg->rate_limits[i].name, PQgetvalue(r, j, 0)) == 0) {
                out[i].read = true;
                out[i].tokens = strtod(PQgetvalue(r, j, 1), NULL);
                out[i].buckets = strtoll(PQgetvalue(r, j, 2), NULL, 10);
                out[i].waited = strtoll(PQgetvalue(r, j, 3), NULL, 10);
                out[i].rejected = strtoll(PQgetvalue(r, j, 4), NULL, 10);
            }
    PQclear(r);
    return 0;
}

int rate_limit_waiting_read(struct db *db, const struct cfg *cfg, struct rate_limit_state *out) {
    if (cfg->nrate_limits == 0) return 0;
    PGresult *r = NULL;
    int rc = db_exec(db, "SELECT rate_limit, count(*) FROM parked_commands WHERE reason = 'rate_limited' "
                         "GROUP BY rate_limit", 0, NULL, &r);
    if (rc < 0) return rc;
    for (int i = 0; i < cfg->nrate_limits; i++) out[i].waiting = 0;
    for (int j = 0; j < PQntuples(r); j++)
        for (int i = 0; i < cfg->nrate_limits; i++)
            if (strcmp(cfg->rate_limits[i].name, PQgetvalue(r, j, 0)) == 0)
                out[i].waiting = strtoll(PQgetvalue(r, j, 1), NULL, 10);
    PQclear(r);
    return 0;
}

cJSON *rate_limit_state_json(const struct rate_limit_state *st) {
    const struct cfg_rate_limit *rl = st->rl;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", rl->name);
    cJSON *types = cJSON_AddArrayToObject(o, "types");
    for (int i = 0; i < rl->ntypes; i++) cJSON_AddItemToArray(types, cJSON_CreateString(rl->types[i]));
    if (rl->queue[0]) cJSON_AddStringToObject(o, "queue", rl->queue);
    else cJSON_AddNullToObject(o, "queue");
    cJSON_AddStringToObject(o, "rate", rl->rate_text);
    cJSON_AddNumberToObject(o, "perSecond", rl->rate);
    cJSON_AddNumberToObject(o, "burst", rl->burst);
    if (rl->key) {
        char key[256];
        snprintf(key, sizeof key, "payload.%s", rl->key);
        cJSON_AddStringToObject(o, "key", key);
    } else {
        cJSON_AddNullToObject(o, "key");
    }
    cJSON_AddStringToObject(o, "over", rl->over == RATE_OVER_WAIT ? "wait" : "reject");
    cJSON_AddNumberToObject(o, "shards", rl->shards);
    cJSON_AddNumberToObject(o, "tokens", st->tokens);
    cJSON_AddNumberToObject(o, "buckets", (double)st->buckets);
    cJSON_AddNumberToObject(o, "waited", (double)st->waited);
    cJSON_AddNumberToObject(o, "rejected", (double)st->rejected);
    cJSON_AddNumberToObject(o, "waiting", (double)st->waiting);
    return o;
}

int rate_limit_prune(struct db *db, const struct cfg *cfg) {
    bool keyed = false;
    for (int i = 0; i < cfg->nrate_limits; i++) keyed |= cfg->rate_limits[i].key != NULL;
    if (!keyed) return 0;
    PGresult *r = NULL;
    /* full for a minute (refilled since its last use, no waiting line ahead):
     * as good as absent; a row a take uses meanwhile is kept (the freshness is
     * checked again on the row the DELETE locks) */
    int rc = limits_exec(db, cfg,
                     "WITH l AS (SELECT * FROM unnest($1::text[], $2::float8[], $3::float8[], $4::int[], $5::bool[]) "
                     "AS l(name, rate, burst, shards, keyed) WHERE keyed), "
                     "idle AS (SELECT r.limit_name, r.bucket FROM rate_limit_buckets r JOIN l ON l.name = r.limit_name "
                     "WHERE r.shard <> -1 GROUP BY r.limit_name, r.bucket, l.rate, l.burst "
                     "HAVING max(r.refilled_at) < clock_timestamp() - make_interval(secs => l.burst / l.rate + 60) "
                     "AND coalesce(max(r.line_until), '-infinity') < clock_timestamp() LIMIT 10000), "
                     "gone AS (DELETE FROM rate_limit_buckets r USING idle i, l WHERE r.limit_name = i.limit_name "
                     "AND r.bucket = i.bucket AND r.shard <> -1 AND l.name = r.limit_name "
                     "AND r.refilled_at < clock_timestamp() - make_interval(secs => l.burst / l.rate + 60) "
                     "RETURNING r.limit_name, r.waited, r.rejected), "
                     "totals AS (INSERT INTO rate_limit_buckets (limit_name, bucket, shard, tokens, refilled_at, "
                     "waited, rejected) SELECT limit_name, '', -1, 0, clock_timestamp(), sum(waited), sum(rejected) FROM gone "
                     "GROUP BY limit_name ON CONFLICT (limit_name, bucket, shard) DO UPDATE SET "
                     "waited = rate_limit_buckets.waited + excluded.waited, "
                     "rejected = rate_limit_buckets.rejected + excluded.rejected) "
                     "SELECT count(*) FROM gone",
                     &r);
    if (rc < 0) return rc;
    int n = atoi(PQgetvalue(r, 0, 0));
    PQclear(r);
    if (n > 0) log_msg(LOG_DEBUG, NULL, "pruned %d idle rate-limit bucket rows", n);
    return n;
}
