/* subscription_view.c - the durable subscriptions as an operator sees them
 * (docs/contract.md section 13): the registry's rows (table subscriptions,
 * sql/0014) with the counts the pools last wrote there and the number of each
 * one's dead letters (subscription_dead); read by conveyor-admin
 * subscriptions, /metrics, /api/subscriptions and the dashboard. The pools'
 * counting is subscription_count.c.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A text column, or NULL when it is NULL (malloc'd). */
static char *opt_text(PGresult *r, int row, int col) {
    return PQgetisnull(r, row, col) ? NULL : xstrdup(PQgetvalue(r, row, col));
}

/* A number column, or dflt when it is NULL. */
static double opt_num(PGresult *r, int row, int col, double dflt) {
    return PQgetisnull(r, row, col) ? dflt : strtod(PQgetvalue(r, row, col), NULL);
}

int subscription_rows_read(struct db *db, const char *name, struct subscription_row **out, int *n) {
    *out = NULL;
    *n = 0;
    PGresult *r;
    const char *p[1] = {name};
    /* oldest_age_seconds has grown since the count while events still wait (as forward_view.c's) */
    int rc = db_exec(db,
                     "SELECT s.name, s.transport, array_to_json(s.patterns)::text, s.partitions, s.start_from, "
                     SQL_RFC3339("s.created_at") ", " SQL_RFC3339("s.last_seen_at") ", s.lag, "
                     "CASE WHEN s.lag > 0 THEN s.oldest_age_seconds + extract(epoch FROM now() - s.counted_at) "
                     "ELSE s.oldest_age_seconds END, "
                     "extract(epoch FROM now() - s.counted_at), s.gap, "
                     "extract(epoch FROM now() - coalesce(s.empty_seen_at, s.created_at)), "
                     "(SELECT count(*) FROM subscription_dead d WHERE d.subscription = s.name) "
                     "FROM subscriptions s WHERE $1::text IS NULL OR s.name = $1::text ORDER BY s.name",
                     1, p, &r);
    if (rc < 0) return rc;
    *n = PQntuples(r);
    *out = xcalloc((size_t)*n + 1, sizeof **out);
    for (int i = 0; i < *n; i++) {
        struct subscription_row *s = &(*out)[i];
        s->name = xstrdup(PQgetvalue(r, i, 0));
        s->transport = xstrdup(PQgetvalue(r, i, 1));
        cJSON *pats = cJSON_Parse(PQgetvalue(r, i, 2));
        s->npatterns = cJSON_IsArray(pats) ? cJSON_GetArraySize(pats) : 0;
        s->patterns = xcalloc((size_t)s->npatterns + 1, sizeof *s->patterns);
        for (int k = 0; k < s->npatterns; k++) {
            const char *v = cJSON_GetStringValue(cJSON_GetArrayItem(pats, k));
            s->patterns[k] = xstrdup(v ? v : "");
        }
        cJSON_Delete(pats);
        s->partitions = atoi(PQgetvalue(r, i, 3));
        s->start_from = xstrdup(PQgetvalue(r, i, 4));
        s->created_at = xstrdup(PQgetvalue(r, i, 5));
        s->last_seen_at = opt_text(r, i, 6);
        s->lag = (long)opt_num(r, i, 7, -1);
        s->oldest_age_s = opt_num(r, i, 8, -1);
        s->counted_age_s = opt_num(r, i, 9, -1);
        s->gap = opt_text(r, i, 10);
        s->empty_age_s = opt_num(r, i, 11, -1);
        s->dead = strtol(PQgetvalue(r, i, 12), NULL, 10);
    }
    PQclear(r);
    return 0;
}

void subscription_rows_free(struct subscription_row *rows, int n) {
    for (int i = 0; rows && i < n; i++) {
        struct subscription_row *s = &rows[i];
        free(s->name);
        free(s->transport);
        for (int k = 0; k < s->npatterns; k++) free(s->patterns[k]);
        free(s->patterns);
        free(s->start_from);
        free(s->created_at);
        free(s->last_seen_at);
        free(s->gap);
    }
    free(rows);
}

bool subscription_row_spec(const struct subscription_row *s, enum transport *t, struct subscription_spec *spec) {
    *spec = (struct subscription_spec){.name = s->name, .patterns = (const char *const *)s->patterns,
                                       .npatterns = s->npatterns, .partitions = s->partitions};
    return transport_parse(s->transport, t);
}

cJSON *subscription_row_json(const struct subscription_row *s) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", s->name);
    cJSON_AddStringToObject(o, "transport", s->transport);
    cJSON *pats = cJSON_AddArrayToObject(o, "patterns");
    for (int k = 0; k < s->npatterns; k++) cJSON_AddItemToArray(pats, cJSON_CreateString(s->patterns[k]));
    cJSON_AddNumberToObject(o, "partitions", s->partitions);
    cJSON_AddStringToObject(o, "from", s->start_from);
    cJSON_AddStringToObject(o, "createdAt", s->created_at);
    json_add_optional(o, "lastSeenAt", s->last_seen_at);
    json_add_number_or_null(o, "lag", (double)s->lag);
    json_add_number_or_null(o, "oldestAgeSeconds", s->oldest_age_s);
    cJSON_AddBoolToObject(o, "gap", s->gap != NULL);
    json_add_optional(o, "gapNote", s->gap);
    cJSON_AddNumberToObject(o, "dead", (double)s->dead);
    json_add_number_or_null(o, "countedAgeSeconds", s->counted_age_s);
    return o;
}
