/* rollup.c - the dashboard's numbers over time, kept by the HTTP child.
 *
 * Every second (rollup_tick) the scoreboard's per-queue totals are copied into
 * a ring of ROLLUP_RING snapshots: a queue's rate is the change over the last
 * RATE_SPAN_S seconds, its p50/p99 latency the percentiles of the latency
 * histogram's change over the ring. At the end of each wall-clock minute the
 * change since the minute began is added into metrics_minute (sql/0006), one
 * row per minute and queue that every pool adds into; rows older than
 * 7 days are deleted once an hour. /api/history reads those rows and
 * adds the minute still running from memory, so the last point moves.
 *
 * The main thread ticks; request threads read. lock guards the ring, base and
 * minute_ms; write_lock is held from a minute's write until base moves past
 * it, and by a history read from its query to its use of base, so a history
 * never counts a minute both from its row and from memory, nor from neither.
 */
#include "http.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROLLUP_RING 61       /* one snapshot a second: a minute of them, and one */
#define RATE_SPAN_S 10
#define PRUNE_EVERY_MS 3600000

struct snapshot {
    int64_t mono_ms;             /* 0: empty */
    struct sb_queue_totals *q;   /* by cfg queue index */
};

struct rollup {
    const struct cfg *cfg;
    pthread_mutex_t lock, write_lock;
    struct snapshot ring[ROLLUP_RING];
    int head;                    /* the newest */
    struct sb_queue_totals *base; /* the totals when minute_ms began */
    int64_t minute_ms;           /* wall-clock start of the minute being counted */
    int64_t pruned_ms;           /* mono time of the last prune */
};

static int64_t minute_of(int64_t wall_ms) { return wall_ms - wall_ms % 60000; }

/* Ended commands in t: applied, rejected and dead (a retry has not ended; a
 * duplicate ended before, and did no work now). */
static uint64_t ended(const struct sb_queue_totals *t) {
    return t->outcomes[SB_APPLIED] + t->outcomes[SB_REJECTED] + t->outcomes[SB_DEAD];
}

static void read_totals(const struct cfg *cfg, struct sb_queue_totals *out) {
    for (int i = 0; i < cfg->nqueues; i++) sb_queue_totals(&cfg->queues[i], &out[i]);
}

struct rollup *rollup_new(const struct cfg *cfg) {
    struct rollup *r = xcalloc(1, sizeof *r);
    r->cfg = cfg;
    pthread_mutex_init(&r->lock, NULL);
    pthread_mutex_init(&r->write_lock, NULL);
    size_t n = (size_t)(cfg->nqueues ? cfg->nqueues : 1);
    for (int k = 0; k < ROLLUP_RING; k++) r->ring[k].q = xcalloc(n, sizeof *r->ring[k].q);
    r->base = xcalloc(n, sizeof *r->base);
    read_totals(cfg, r->base);
    r->minute_ms = minute_of(clock_ms());
    return r;
}

void rollup_free(struct rollup *r) {
    if (!r) return;
    for (int k = 0; k < ROLLUP_RING; k++) free(r->ring[k].q);
    free(r->base);
    pthread_mutex_destroy(&r->lock);
    pthread_mutex_destroy(&r->write_lock);
    free(r);
}

/* What a queue's workers ended in a span: a minute's row, a step of the history. */
struct step {
    uint64_t applied, retried, rejected, dead, duplicate; /* duplicate: absorbed by its dedup row, no work */
    uint64_t latency[SB_LATENCY_BUCKETS + 1];
};

/* Adds to *s what happened between totals a and the later b. */
static void add_delta(struct step *s, const struct sb_queue_totals *a, const struct sb_queue_totals *b) {
    s->applied += b->outcomes[SB_APPLIED] - a->outcomes[SB_APPLIED];
    s->duplicate += b->outcomes[SB_DUPLICATE] - a->outcomes[SB_DUPLICATE];
    s->retried += b->outcomes[SB_RETRIED] - a->outcomes[SB_RETRIED];
    s->rejected += b->outcomes[SB_REJECTED] - a->outcomes[SB_REJECTED];
    s->dead += b->outcomes[SB_DEAD] - a->outcomes[SB_DEAD];
    for (int j = 0; j <= SB_LATENCY_BUCKETS; j++) s->latency[j] += b->latency[j] - a->latency[j];
}

/* Adds now - base of every queue into the row of r->minute_ms. Returns 0 or the
 * error class (the base then stays: the next try adds the same counts). */
static int write_minute(struct rollup *r, struct db *db, const struct sb_queue_totals *now) {
    if (!db) return CV_ERETRY;
    char minute[32];
    clock_rfc3339(r->minute_ms, minute);
    int rc = db_cmd(db, "BEGIN");
    for (int i = 0; i < r->cfg->nqueues && rc == 0; i++) {
        struct step d = {0};
        add_delta(&d, &r->base[i], &now[i]);
        if (d.applied + d.retried + d.rejected + d.dead + d.duplicate == 0) continue;
        char applied[24], rejected[24], retried[24], dead[24], duplicate[24], lat[(SB_LATENCY_BUCKETS + 1) * 22 + 4];
        snprintf(applied, sizeof applied, "%llu", (unsigned long long)d.applied);
        snprintf(rejected, sizeof rejected, "%llu", (unsigned long long)d.rejected);
        snprintf(retried, sizeof retried, "%llu", (unsigned long long)d.retried);
        snprintf(dead, sizeof dead, "%llu", (unsigned long long)d.dead);
        snprintf(duplicate, sizeof duplicate, "%llu", (unsigned long long)d.duplicate);
        size_t k = 0;
        lat[k++] = '{';
        for (int j = 0; j <= SB_LATENCY_BUCKETS; j++)
            k += (size_t)snprintf(lat + k, sizeof lat - k, "%s%llu", j ? "," : "", (unsigned long long)d.latency[j]);
        snprintf(lat + k, sizeof lat - k, "}");
        const char *p[8] = {minute, r->cfg->queues[i].name, applied, rejected, retried, dead, lat, duplicate};
        /* several pools add into one row: each adds its own counts */
        rc = db_exec(db,
                     "INSERT INTO metrics_minute AS m (minute, queue, applied, rejected, retried, dead, latency, "
                     "duplicate) VALUES ($1, $2, $3, $4, $5, $6, $7::bigint[], $8) ON CONFLICT (minute, queue) DO "
                     "UPDATE SET applied = m.applied + excluded.applied, rejected = m.rejected + excluded.rejected, "
                     "retried = m.retried + excluded.retried, dead = m.dead + excluded.dead, "
                     "duplicate = m.duplicate + excluded.duplicate, "
                     "latency = ARRAY(SELECT coalesce(x, 0) + coalesce(y, 0) "
                     "FROM unnest(m.latency, excluded.latency) WITH ORDINALITY AS u(x, y, i) ORDER BY i)",
                     8, p, NULL);
    }
    if (rc == 0) rc = db_cmd(db, "COMMIT");
    if (rc < 0) {
        log_warn("cannot write the dashboard's minute %s (kept for the next try): %s", minute, db_errstr(db));
        (void)db_cmd(db, "ROLLBACK");
    }
    return rc;
}

void rollup_tick(struct rollup *r, struct db *db) {
    struct snapshot *next = &r->ring[(r->head + 1) % ROLLUP_RING];
    struct sb_queue_totals *now = xcalloc((size_t)(r->cfg->nqueues ? r->cfg->nqueues : 1), sizeof *now);
    read_totals(r->cfg, now);
    pthread_mutex_lock(&r->lock);
    memcpy(next->q, now, (size_t)r->cfg->nqueues * sizeof *now);
    next->mono_ms = clock_mono_ms();
    r->head = (r->head + 1) % ROLLUP_RING;
    pthread_mutex_unlock(&r->lock);
    int64_t minute = minute_of(clock_ms());
    if (minute != r->minute_ms) {
        pthread_mutex_lock(&r->write_lock);
        if (write_minute(r, db, now) == 0) {
            pthread_mutex_lock(&r->lock);
            memcpy(r->base, now, (size_t)r->cfg->nqueues * sizeof *now);
            r->minute_ms = minute;
            pthread_mutex_unlock(&r->lock);
        }
        pthread_mutex_unlock(&r->write_lock);
    }
    if (db && (r->pruned_ms == 0 || clock_mono_ms() - r->pruned_ms > PRUNE_EVERY_MS)) {
        r->pruned_ms = clock_mono_ms();
        if (db_cmd(db, "DELETE FROM metrics_minute WHERE minute < now() - interval '7 days'") < 0)
            log_warn("cannot prune the dashboard's history: %s", db_errstr(db));
    }
    free(now);
}

void rollup_flush(struct rollup *r, struct db *db) {
    struct sb_queue_totals *now = xcalloc((size_t)(r->cfg->nqueues ? r->cfg->nqueues : 1), sizeof *now);
    read_totals(r->cfg, now);
    pthread_mutex_lock(&r->write_lock);
    if (!db) log_warn("the dashboard's running minute is not written: no database");
    if (write_minute(r, db, now) == 0) { /* a failure is logged by write_minute */
        pthread_mutex_lock(&r->lock);
        memcpy(r->base, now, (size_t)r->cfg->nqueues * sizeof *now);
        pthread_mutex_unlock(&r->lock);
    }
    pthread_mutex_unlock(&r->write_lock);
    free(now);
}

/* The q-quantile (0..1) of histogram h (not cumulative, SB_LATENCY_BUCKETS + 1
 * counts) in seconds, interpolated in its bucket; NAN when h is empty. */
static double quantile(const uint64_t *h, double q) {
    uint64_t total = 0;
    for (int b = 0; b <= SB_LATENCY_BUCKETS; b++) total += h[b];
    if (total == 0) return NAN;
    double want = q * (double)total, cum = 0;
    for (int b = 0; b <= SB_LATENCY_BUCKETS; b++) {
        if (h[b] == 0) continue;
        if (cum + (double)h[b] >= want) {
            if (b == SB_LATENCY_BUCKETS) return sb_latency_bounds[SB_LATENCY_BUCKETS - 1]; /* above every bound */
            double lo = b ? sb_latency_bounds[b - 1] : 0, hi = sb_latency_bounds[b];
            return lo + (hi - lo) * (want - cum) / (double)h[b];
        }
        cum += (double)h[b];
    }
    return sb_latency_bounds[SB_LATENCY_BUCKETS - 1];
}

/* The snapshot at least span_ms older than the newest (else the oldest), or NULL when there is one only. */
static const struct snapshot *back(const struct rollup *r, int64_t span_ms) {
    const struct snapshot *newest = &r->ring[r->head], *found = NULL;
    for (int k = 1; k < ROLLUP_RING; k++) {
        const struct snapshot *s = &r->ring[(r->head - k + ROLLUP_RING) % ROLLUP_RING];
        if (!s->mono_ms) break;
        found = s;
        if (newest->mono_ms - s->mono_ms >= span_ms) break;
    }
    return found;
}

void rollup_live(struct rollup *r, int qi, struct rollup_live *out) {
    memset(out, 0, sizeof *out);
    out->p50 = out->p99 = NAN;
    pthread_mutex_lock(&r->lock);
    const struct snapshot *newest = &r->ring[r->head];
    if (newest->mono_ms) {
        out->done = ended(&newest->q[qi]);
        const struct snapshot *s = back(r, RATE_SPAN_S * 1000);
        if (s && newest->mono_ms > s->mono_ms)
            out->rate = (double)(ended(&newest->q[qi]) - ended(&s->q[qi])) * 1000.0 / (double)(newest->mono_ms - s->mono_ms);
        s = back(r, 60000);
        if (s) {
            uint64_t h[SB_LATENCY_BUCKETS + 1];
            for (int b = 0; b <= SB_LATENCY_BUCKETS; b++) h[b] = newest->q[qi].latency[b] - s->q[qi].latency[b];
            out->p50 = quantile(h, 0.5);
            out->p99 = quantile(h, 0.99);
        }
    }
    pthread_mutex_unlock(&r->lock);
}


cJSON *rollup_history(struct rollup *r, struct db *db, bool day, char *err, size_t errlen) {
    int step_s = day ? 300 : 60, nsteps = day ? 288 : 60;
    int64_t now = clock_ms(), last = now - now % ((int64_t)step_s * 1000);
    int64_t first = last - (int64_t)(nsteps - 1) * step_s * 1000;
    struct step *st = xcalloc((size_t)nsteps, sizeof *st);
    char from[32];
    clock_rfc3339(first, from);
    const char *p[1] = {from};
    PGresult *res = NULL;
    pthread_mutex_lock(&r->write_lock); /* until the running minute is added: see the file's comment */
    if (!db || db_exec(db, "SELECT (extract(epoch FROM minute) * 1000)::bigint, applied, rejected, dead, latency::text, "
                           "duplicate "
                           "FROM metrics_minute WHERE minute >= $1", 1, p, &res) < 0) {
        snprintf(err, errlen, "cannot read the history: %s", db ? db_errstr(db) : "no database");
        pthread_mutex_unlock(&r->write_lock);
        free(st);
        return NULL;
    }
    for (int i = 0; i < PQntuples(res); i++) {
        int64_t t = atoll(PQgetvalue(res, i, 0));
        int k = (int)((t - first) / ((int64_t)step_s * 1000));
        if (k < 0 || k >= nsteps) continue;
        st[k].applied += strtoull(PQgetvalue(res, i, 1), NULL, 10);
        st[k].rejected += strtoull(PQgetvalue(res, i, 2), NULL, 10);
        st[k].dead += strtoull(PQgetvalue(res, i, 3), NULL, 10);
        st[k].duplicate += strtoull(PQgetvalue(res, i, 5), NULL, 10);
        const char *a = PQgetvalue(res, i, 4); /* {n,n,...} */
        for (int b = 0; b <= SB_LATENCY_BUCKETS && *a; b++) {
            while (*a == '{' || *a == ',') a++;
            char *end;
            st[k].latency[b] += strtoull(a, &end, 10);
            a = end;
        }
    }
    PQclear(res);
    /* the minute still running, from memory */
    pthread_mutex_lock(&r->lock);
    const struct snapshot *newest = &r->ring[r->head];
    int k = (int)((r->minute_ms - first) / ((int64_t)step_s * 1000));
    if (newest->mono_ms && k >= 0 && k < nsteps)
        for (int i = 0; i < r->cfg->nqueues; i++) {
            add_delta(&st[k], &r->base[i], &newest->q[i]);
        }
    pthread_mutex_unlock(&r->lock);
    pthread_mutex_unlock(&r->write_lock);
    cJSON *o = cJSON_CreateObject(), *points = cJSON_CreateArray();
    cJSON_AddStringToObject(o, "range", day ? "day" : "hour");
    cJSON_AddNumberToObject(o, "stepSeconds", step_s);
    for (int i = 0; i < nsteps; i++) {
        cJSON *pt = cJSON_CreateObject();
        cJSON_AddNumberToObject(pt, "t", (double)((first / 1000) + (int64_t)i * step_s));
        cJSON_AddNumberToObject(pt, "commands", (double)(st[i].applied + st[i].rejected + st[i].dead));
        cJSON_AddNumberToObject(pt, "applied", (double)st[i].applied);
        cJSON_AddNumberToObject(pt, "rejected", (double)st[i].rejected);
        cJSON_AddNumberToObject(pt, "dead", (double)st[i].dead);
        cJSON_AddNumberToObject(pt, "duplicate", (double)st[i].duplicate); /* not in commands: no work */
        json_add_number_or_null(pt, "p50", quantile(st[i].latency, 0.5));
        json_add_number_or_null(pt, "p99", quantile(st[i].latency, 0.99));
        cJSON_AddItemToArray(points, pt);
    }
    cJSON_AddItemToObject(o, "points", points);
    free(st);
    return o;
}
