/* pool_load.c - what this pool's workers hold, per queue, written to
 * PostgreSQL (pool_in_flight, sql/0008) so that conveyor-admin stats, which
 * runs outside every pool, can show in flight on RabbitMQ (whose unacked
 * counts only its management plugin tells): the sum over the pools whose rows
 * are fresh. The pool's relay, active or standing by, writes at most once a
 * second (pool_load_report); a clean stop deletes the rows (pool_load_forget);
 * the rows of a killed pool go stale after POOL_LOAD_FRESH_S and stop counting.
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
