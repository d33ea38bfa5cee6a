/* forward_view.c - the producers' outboxes as an operator sees them: what
 * forward_state (sql/0013) says of each producer of queues.conf, written by
 * the forwarders from counts in the producer's own database; read by
 * /metrics, /api/producers, the dashboard and conveyor-admin stats. */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int forward_states_read(struct db *db, const struct cfg *cfg, struct forward_state *out) {
    for (int i = 0; i < cfg->nproducers; i++)
        out[i] = (struct forward_state){.producer = &cfg->producers[i], .report_age_s = -1};
    if (cfg->nproducers == 0) return 0;
    const char **names = xcalloc((size_t)cfg->nproducers, sizeof *names);
    for (int i = 0; i < cfg->nproducers; i++) names[i] = cfg->producers[i].name;
    char *arr = db_array(names, cfg->nproducers);
    free(names);
    const char *p[1] = {arr};
    PGresult *r;
    int rc = db_exec(db, "SELECT producer, pending, failed, oldest_age_s + extract(epoch FROM now() - updated_at), "
                         "extract(epoch FROM now() - updated_at) FROM forward_state WHERE producer = ANY($1::text[])",
                     1, p, &r);
    free(arr);
    if (rc < 0) return rc;
    for (int k = 0; k < PQntuples(r); k++)
        for (int i = 0; i < cfg->nproducers; i++) {
            if (strcmp(cfg->producers[i].name, PQgetvalue(r, k, 0)) != 0) continue;
            struct forward_state *st = &out[i];
            st->read = true;
            st->pending = strtoll(PQgetvalue(r, k, 1), NULL, 10);
            st->failed = strtoll(PQgetvalue(r, k, 2), NULL, 10);
            /* the oldest pending row has aged since the count, as long as it still waits */
            st->oldest_age_s = st->pending > 0 ? strtod(PQgetvalue(r, k, 3), NULL) : 0;
            st->report_age_s = strtod(PQgetvalue(r, k, 4), NULL);
        }
    PQclear(r);
    return 0;
}

cJSON *forward_state_json(const struct forward_state *st) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "producer", st->producer->name);
    if (st->read) {
        cJSON_AddNumberToObject(o, "pending", (double)st->pending);
        cJSON_AddNumberToObject(o, "failed", (double)st->failed);
        cJSON_AddNumberToObject(o, "oldestAgeSeconds", st->oldest_age_s);
    } else {
        cJSON_AddNullToObject(o, "pending");
        cJSON_AddNullToObject(o, "failed");
        cJSON_AddNullToObject(o, "oldestAgeSeconds");
    }
    json_add_number_or_null(o, "reportAgeSeconds", st->report_age_s);
    return o;
}
