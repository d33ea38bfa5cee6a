/* dedup_prune.c - the dedup table does not grow for ever: processed_commands
 * rows older than dedup.retention_days are deleted, off the hot path (the
 * active relay calls this once a minute), in small batches so that no
 * statement holds many row locks or writes much WAL at once, within a time
 * budget per pass. A command replayed (the same id) after its row is gone is
 * applied again: the window is how long a producer may resend. */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>

long dedup_prune(struct db *db, const struct cfg *cfg, int budget_ms) {
    if (cfg->dedup_retention_days <= 0) return 0;
    char days[16], batch[16];
    snprintf(days, sizeof days, "%d", cfg->dedup_retention_days);
    snprintf(batch, sizeof batch, "%d", cfg->dedup_prune_batch);
    const char *p[2] = {days, batch};
    int64_t deadline = clock_mono_ms() + budget_ms;
    long total = 0;
    int rc = 0;
    for (;;) {
        PGresult *r;
        /* the oldest rows first, by the processed_at index (sql/0005) */
        rc = db_exec(db, "DELETE FROM processed_commands WHERE id IN (SELECT id FROM processed_commands "
                             "WHERE processed_at < now() - make_interval(days => $1::int) "
                             "ORDER BY processed_at LIMIT $2::int)",
                         2, p, &r);
        if (rc < 0) break; /* logged by db_exec; what earlier batches pruned is said below */
        long n = strtol(PQcmdTuples(r), NULL, 10);
        PQclear(r);
        total += n;
        if (n < cfg->dedup_prune_batch || clock_mono_ms() >= deadline) break;
    }
    if (total > 0)
        log_info("pruned %ld processed_commands row%s older than %d days (dedup.retention_days)", total,
                 total == 1 ? "" : "s", cfg->dedup_retention_days);
    return rc < 0 && total == 0 ? rc : total;
}
