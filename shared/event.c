/* event.c - the event envelope (docs/contract.md, "The event envelope"). */
#include "core.h"

#include <stdlib.h>

cJSON *event_new(const char *type, const struct envelope *cmd, const char *aggregate_type,
                 const char *aggregate_id, cJSON *data) {
    char id[ID_LEN + 1], ts[32];
    id_new(id);
    clock_rfc3339(clock_ms(), ts);
    cJSON *e = cJSON_CreateObject();
    cJSON_AddStringToObject(e, "id", id);
    cJSON_AddStringToObject(e, "type", type);
    cJSON_AddStringToObject(e, "occurredAt", ts);
    cJSON_AddStringToObject(e, "commandId", cmd->id);
    cJSON_AddStringToObject(e, "commandType", cmd->type);
    if (cmd->correlation_id) cJSON_AddStringToObject(e, "correlationId", cmd->correlation_id);
    else cJSON_AddNullToObject(e, "correlationId");
    char traceparent[TRACEPARENT_LEN + 1];
    if (trace_child(&cmd->trace, traceparent)) cJSON_AddStringToObject(e, "traceparent", traceparent);
    cJSON_AddStringToObject(e, "aggregateType", aggregate_type);
    cJSON_AddStringToObject(e, "aggregateId", aggregate_id);
    cJSON_AddItemToObject(e, "data", data ? data : cJSON_CreateObject());
    return e;
}

int event_outbox_defer(struct db *db, const cJSON *events) {
    char *json = cJSON_PrintUnformatted(events);
    if (!json) return CV_ERETRY; /* out of memory: without its events the transaction must not commit */
    const char *p[1] = {json};
    int rc = db_defer(db, "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, payload) "
                          "SELECT (e->>'id')::uuid, e->>'aggregateType', (e->>'aggregateId')::uuid, e->>'type', e "
                          "FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS t(e, n) ORDER BY n", 1, p);
    free(json);
    return rc;
}
