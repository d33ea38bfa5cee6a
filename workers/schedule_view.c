/* schedule_view.c - the schedules as an operator sees them (conveyor-admin
 * schedules, the dashboard, /metrics): every schedule of the configuration
 * joined with its row of the schedules table (sql/0010), which the timekeeper
 * writes as it fires slots: paused, the last slot and the outcome of its
 * command, the next slot, fired, missed, runs; and pause / resume, which
 * upsert that row (the timekeeper fires no slot of a paused schedule).
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The schedule of cfg called name, or NULL. */
static const struct cfg_schedule *configured(const struct cfg *cfg, const char *name) {
    for (int i = 0; i < cfg->nschedules; i++)
        if (strcmp(cfg->schedules[i].name, name) == 0) return &cfg->schedules[i];
    return NULL;
}

/* Copies column c of row i of r into out (n bytes); "" when NULL. */
static void text_of(const PGresult *r, int i, int c, char *out, size_t n) {
    snprintf(out, n, "%s", PQgetisnull(r, i, c) ? "" : PQgetvalue(r, i, c));
}

/* Fills st from row i of r (the read's columns). */
static void state_copy(const PGresult *r, int i, struct schedule_state *st) {
    st->has_row = true;
    st->paused = PQgetvalue(r, i, 1)[0] == 't';
    text_of(r, i, 2, st->last_slot, sizeof st->last_slot);
    text_of(r, i, 3, st->last_slot_at, sizeof st->last_slot_at);
    st->last_slot_s = atof(PQgetvalue(r, i, 4));
    text_of(r, i, 5, st->last_command_id, sizeof st->last_command_id);
    text_of(r, i, 6, st->last_outcome, sizeof st->last_outcome);
    text_of(r, i, 7, st->next_slot_at, sizeof st->next_slot_at);
    st->fired = atoll(PQgetvalue(r, i, 8));
    st->missed = atoll(PQgetvalue(r, i, 9));
    st->runs = atoll(PQgetvalue(r, i, 10));
    text_of(r, i, 11, st->updated_at, sizeof st->updated_at);
    text_of(r, i, 12, st->updated_by, sizeof st->updated_by);
}

int schedule_states_read(struct db *db, const struct cfg *cfg, struct schedule_state *out) {
    memset(out, 0, (size_t)cfg->nschedules * sizeof *out);
    for (int i = 0; i < cfg->nschedules; i++) out[i].s = &cfg->schedules[i];
    if (cfg->nschedules == 0) return 0;
    const char **names = xcalloc((size_t)cfg->nschedules, sizeof *names);
    for (int i = 0; i < cfg->nschedules; i++) names[i] = cfg->schedules[i].name;
    char *arr = db_array(names, cfg->nschedules);
    free(names);
    const char *p[1] = {arr};
    PGresult *r;
    int rc = db_exec(db, "SELECT s.name, s.paused, s.last_slot, " SQL_RFC3339("s.last_slot_at") ", "
                         "coalesce(extract(epoch FROM s.last_slot_at), 0)::float8, s.last_command_id, "
                         "CASE WHEN s.last_command_id IS NOT NULL THEN coalesce(p.outcome, 'pending') END, "
                         SQL_RFC3339("s.next_slot_at") ", s.fired, s.missed, s.runs, " SQL_RFC3339("s.updated_at")
                         ", s.updated_by FROM schedules s LEFT JOIN processed_commands p ON p.id = s.last_command_id "
                         "WHERE s.name = ANY($1::text[])", 1, p, &r);
    free(arr);
    if (rc < 0) return rc;
    for (int i = 0; i < PQntuples(r); i++) {
        const struct cfg_schedule *s = configured(cfg, PQgetvalue(r, i, 0));
        if (s) state_copy(r, i, &out[s - cfg->schedules]);
    }
    PQclear(r);
    return 0;
}

int schedule_pause_set(struct db *db, const struct cfg *cfg, const char *name, bool paused, const char *by) {
    if (!configured(cfg, name)) return CV_EREJECT;
    const char *p[3] = {name, paused ? "true" : "false", by};
    return db_exec(db, "INSERT INTO schedules (name, paused, updated_by) VALUES ($1, $2::boolean, $3) "
                       "ON CONFLICT (name) DO UPDATE SET paused = $2::boolean, updated_at = now(), updated_by = $3",
                   3, p, NULL);
}

cJSON *schedule_state_json(const struct schedule_state *st) {
    const struct cfg_schedule *s = st->s;
    static const char *const catch_up[] = {"none", "last", "all"};
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", s->name);
    cJSON_AddStringToObject(o, "type", s->type);
    cJSON_AddStringToObject(o, "kind", s->kind == SCHEDULE_EVERY ? "every" : "cron");
    json_add_optional(o, "cron", s->kind == SCHEDULE_CRON ? s->cron_text : NULL);
    json_add_optional(o, "timezone", s->kind == SCHEDULE_CRON ? (s->timezone[0] ? s->timezone : "UTC") : NULL);
    json_add_number_or_null(o, "everySeconds", s->kind == SCHEDULE_EVERY ? (double)s->every_s : -1);
    cJSON_AddStringToObject(o, "catchUp", catch_up[s->catch_up]);
    cJSON_AddBoolToObject(o, "paused", st->paused);
    json_add_optional(o, "nextSlotAt", st->next_slot_at[0] ? st->next_slot_at : NULL);
    json_add_optional(o, "lastSlot", st->last_slot[0] ? st->last_slot : NULL);
    json_add_optional(o, "lastSlotAt", st->last_slot_at[0] ? st->last_slot_at : NULL);
    json_add_optional(o, "lastCommandId", st->last_command_id[0] ? st->last_command_id : NULL);
    json_add_optional(o, "lastOutcome", st->last_outcome[0] ? st->last_outcome : NULL);
    cJSON_AddNumberToObject(o, "fired", (double)st->fired);
    cJSON_AddNumberToObject(o, "missed", (double)st->missed);
    cJSON_AddNumberToObject(o, "runs", (double)st->runs);
    json_add_optional(o, "changedAt", st->updated_by[0] ? st->updated_at : NULL);
    json_add_optional(o, "changedBy", st->updated_by[0] ? st->updated_by : NULL);
    return o;
}
