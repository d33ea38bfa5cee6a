/* producer_types.c - what a producer's database knows of queues.conf: the
 * command types conveyor.enqueue accepts (conveyor.command_types) and
 * limits.max_message_bytes (conveyor.settings), written by conveyor-admin
 * producer install and by each forwarder that becomes active. */
#include "workers.h"

#include <stdbool.h>
#include <stdio.h>

/* Writes the types queues.conf routes (and limits.max_message_bytes) to the
 * producer database, for conveyor.enqueue's checks, in one transaction; with
 * prune (conveyor-admin producer install) the types it does not route are
 * deleted, else (a forwarder) they stay: pools of a rolling deploy may route
 * more. Returns 0 or an
 * error class (the producer's schema missing: CV_EREFUSED). */
int producer_types_sync(struct db *db, const struct cfg *cfg, bool prune) {
    int rc = db_cmd(db, "BEGIN");
    if (rc == 0 && prune) rc = db_cmd(db, "DELETE FROM conveyor.command_types");
    for (int i = 0; rc == 0 && i < cfg->nqueues; i++)
        for (int j = 0; rc == 0 && j < cfg->queues[i].ncommands; j++) {
            const char *p[2] = {cfg->queues[i].commands[j], cfg->queues[i].name};
            rc = db_exec(db, "INSERT INTO conveyor.command_types (type, queue) VALUES ($1, $2) "
                             "ON CONFLICT (type) DO UPDATE SET queue = excluded.queue", 2, p, NULL);
        }
    char max[24];
    snprintf(max, sizeof max, "%ld", cfg->max_message_bytes);
    const char *mp[1] = {max};
    if (rc == 0)
        rc = db_exec(db, "UPDATE conveyor.settings SET value = $1::bigint WHERE name = 'max_message_bytes'", 1, mp,
                     NULL);
    if (rc == 0) rc = db_cmd(db, "COMMIT");
    if (rc < 0) (void)db_cmd(db, "ROLLBACK");
    return rc;
}
