/* pool_load.c - what this pool's workers hold, per queue, written to
 * PostgreSQL (pool_in_flight, sql/0008) so that conveyor-admin stats, which
 * runs outside every pool, can show in flight on RabbitMQ (whose unacked
 * counts only its management plugin tells): the sum over the pools whose rows
 * are fresh. The pool's relay, active or standing by, writes at most once a
 * second (pool_load_report); a clean stop deletes the rows (pool_load_forget);
 * the rows of a killed pool go stale after POOL_LOAD_FRESH_S and stop counting.
 * With them, per lane of a laned queue, the createdAt of the oldest command
 * its workers hold (lane_oldest, sql/0012; from the scoreboard,
 * sb_queue_lane_oldest): the lane's oldest age on RabbitMQ.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define REPORT_EVERY_MS 1000

/* This pool's name: <host>-<supervisor pid> (the caller is a child of the supervisor). */
static void pool_name(char *out, size_t n) {
    char host[64];
    if (gethostname(host, sizeof host) != 0) snprintf(host, sizeof host, "localhost");
    host[sizeof host - 1] = '\0';
    snprintf(out, n, "%s-%d", host, (int)getppid());
}

/* This pool's lane_oldest rows: one per lane whose workers hold a command with
 * a createdAt, the pool's others deleted. Nothing without a laned queue on
 * RabbitMQ (Redis reads its lanes' heads). */
static void report_lanes(struct db *db, const struct cfg *cfg, const char *pool) {
    int total = 0;
    for (int i = 0; i < cfg->nqueues; i++)
        if (cfg->queues[i].lanes >= 2 && cfg->queues[i].transport == TRANSPORT_RABBITMQ)
            total += LANE_CLASSES * cfg->queues[i].lanes;
    if (!total) return;
    const char **qs = xcalloc((size_t)total, sizeof *qs), **ls = xcalloc((size_t)total, sizeof *ls),
               **ms = xcalloc((size_t)total, sizeof *ms);
    char (*lane)[32] = xcalloc((size_t)total, sizeof *lane), (*at)[24] = xcalloc((size_t)total, sizeof *at);
    int64_t oldest[LANE_CLASSES * LANES_MAX];
    int n = 0;
    for (int i = 0; i < cfg->nqueues; i++) {
        const struct cfg_queue *q = &cfg->queues[i];
        if (q->lanes < 2 || q->transport != TRANSPORT_RABBITMQ) continue;
        sb_queue_lane_oldest(q, oldest);
        for (int k = 0; k < LANE_CLASSES * q->lanes; k++) {
            if (oldest[k] <= 0) continue;
            lane_label(q->lanes, k, lane[n], sizeof lane[n]);
            snprintf(at[n], sizeof at[n], "%lld", (long long)oldest[k]);
            qs[n] = q->name, ls[n] = lane[n], ms[n] = at[n];
            n++;
        }
    }
    char *qa = db_array(qs, n), *la = db_array(ls, n), *ma = db_array(ms, n);
    const char *p[4] = {pool, qa, la, ma};
    if (db_exec(db, "WITH u AS (SELECT q, l, to_timestamp(m / 1000.0) AS at "
                    "FROM unnest($2::text[], $3::text[], $4::bigint[]) AS u(q, l, m)), "
                    "up AS (INSERT INTO lane_oldest (pool, queue, lane, oldest_at) SELECT $1, q, l, at FROM u "
                    "ON CONFLICT (pool, queue, lane) DO UPDATE SET oldest_at = EXCLUDED.oldest_at, updated_at = now()) "
                    "DELETE FROM lane_oldest o WHERE o.pool = $1 AND (o.queue, o.lane) NOT IN (SELECT q, l FROM u)",
                4, p, NULL) < 0)
        log_debug("lanes' oldest not reported: %s", db_errstr(db)); /* stale: not counted */
    free(qa);
    free(la);
    free(ma);
    free(qs);
    free(ls);
    free(ms);
    free(lane);
    free(at);
}

void pool_load_report(struct db *db, const struct cfg *cfg) {
    static int64_t next_ms;
    int64_t now = clock_mono_ms();
    if (now < next_ms || cfg->nqueues < 1) return;
    next_ms = now + REPORT_EVERY_MS;
    const char **names = xcalloc((size_t)cfg->nqueues, sizeof *names);
    char (*counts)[24] = xcalloc((size_t)cfg->nqueues, sizeof *counts);
    const char **cp = xcalloc((size_t)cfg->nqueues, sizeof *cp);
    for (int i = 0; i < cfg->nqueues; i++) {
        struct sb_queue_totals t;
        sb_queue_totals(&cfg->queues[i], &t);
        names[i] = cfg->queues[i].name;
        snprintf(counts[i], sizeof counts[i], "%ld", t.in_hand);
        cp[i] = counts[i];
    }
    char pool[128];
    pool_name(pool, sizeof pool);
    char *qa = db_array(names, cfg->nqueues), *ca = db_array(cp, cfg->nqueues);
    const char *p[3] = {pool, qa, ca};
    if (db_exec(db, "INSERT INTO pool_in_flight (pool, queue, in_flight) "
                    "SELECT $1, q, n FROM unnest($2::text[], $3::int[]) AS u(q, n) "
                    "ON CONFLICT (pool, queue) DO UPDATE SET in_flight = EXCLUDED.in_flight, updated_at = now()",
                3, p, NULL) < 0)
        log_debug("in-flight counts not reported: %s", db_errstr(db)); /* stats shows them stale: not counted */
    report_lanes(db, cfg, pool);
    free(qa);
    free(ca);
    free(names);
    free(counts);
    free(cp);
}

void pool_load_forget(struct db *db) {
    char pool[128];
    pool_name(pool, sizeof pool);
    const char *p[1] = {pool};
    (void)db_exec(db, "DELETE FROM pool_in_flight WHERE pool = $1", 1, p, NULL);
    (void)db_exec(db, "DELETE FROM lane_oldest WHERE pool = $1", 1, p, NULL);
}

int pool_load_read(struct db *db, const struct cfg *cfg, long *in_flight) {
    for (int i = 0; i < cfg->nqueues; i++) in_flight[i] = 0;
    PGresult *r;
    int rc = db_exec(db, "SELECT queue, sum(in_flight) FROM pool_in_flight WHERE updated_at > now() - "
                         "make_interval(secs => " POOL_LOAD_FRESH_S_TEXT ") GROUP BY queue", 0, NULL, &r);
    if (rc < 0) return rc;
    for (int i = 0; i < PQntuples(r); i++) {
        const struct cfg_queue *q = cfg_queue_named(cfg, PQgetvalue(r, i, 0));
        if (q) in_flight[q - cfg->queues] = atol(PQgetvalue(r, i, 1));
    }
    PQclear(r);
    return 0;
}

int pool_load_lane_ages(struct db *db, const struct cfg_queue *q, struct lane_count *out) {
    const char *p[1] = {q->name};
    PGresult *r;
    int rc = db_exec(db, "SELECT lane, extract(epoch FROM now() - min(oldest_at)) FROM lane_oldest "
                         "WHERE queue = $1 AND updated_at > now() - make_interval(secs => " POOL_LOAD_FRESH_S_TEXT
                         ") GROUP BY lane", 1, p, &r);
    if (rc < 0) return rc;
    for (int j = 0; j < PQntuples(r); j++) {
        const char *lane = PQgetvalue(r, j, 0);
        for (int k = 0; k < LANE_CLASSES * q->lanes; k++) {
            char name[32];
            if (strcmp(lane_label(q->lanes, k, name, sizeof name), lane) != 0) continue;
            double age = atof(PQgetvalue(r, j, 1));
            out[k].oldest_age_s = age > 0 ? age : 0;
            break;
        }
    }
    PQclear(r);
    return 0;
}
