/* schedule_zone.c - a schedule's slots against the clock and the tz data of the
 * database: a slot's instant, the wall time now, a slot's instant as written
 * with its zone's offset. PostgreSQL's tz data decides (the migration 0010's
 * conveyor_wall_instant), never this process's TZ or the session's TimeZone. */
#include "core.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Runs sql with params and reads its one row's columns as integers into
 * v[0..ncols-1]. Returns 0 or db_exec's class (a result of another shape is
 * CV_EREFUSED: a bug). */
static int query_ints(struct db *db, const char *sql, int nparams, const char *const *params, int64_t *v,
                      int ncols) {
    PGresult *r = NULL;
    int rc = db_exec(db, sql, nparams, params, &r);
    if (rc < 0) return rc;
    if (PQntuples(r) != 1 || PQnfields(r) < ncols) {
        PQclear(r);
        return CV_EREFUSED;
    }
    for (int i = 0; i < ncols; i++) {
        if (PQgetisnull(r, 0, i)) {
            PQclear(r);
            return CV_EREFUSED;
        }
        v[i] = strtoll(PQgetvalue(r, 0, i), NULL, 10);
    }
    PQclear(r);
    return 0;
}

int schedule_slot_instant(struct db *db, const struct cfg_schedule *s, int64_t slot, int64_t *instant_ms) {
    if (s->kind == SCHEDULE_EVERY) {
        *instant_ms = slot * 1000;
        return 0;
    }
    char key[SLOT_KEY_MAX];
    schedule_slot_key(s, slot, key);
    const char *params[] = {key, s->timezone};
    return query_ints(db,
                      "SELECT floor(extract(epoch FROM conveyor_wall_instant($1::timestamp, $2)) * 1000)::bigint",
                      2, params, instant_ms, 1);
}

int schedule_wall_now(struct db *db, const struct cfg_schedule *s, int64_t *now_slot_base, int64_t *now_ms) {
    const char *params[] = {s->kind == SCHEDULE_CRON ? s->timezone : "UTC"};
    int64_t v[2];
    /* extract(epoch) of a timestamp without time zone: its wall fields as if UTC (naive seconds) */
    int rc = query_ints(db,
                        "SELECT floor(extract(epoch FROM now()) * 1000)::bigint,"
                        " floor(extract(epoch FROM (now() AT TIME ZONE $1)))::bigint",
                        1, params, v, 2);
    if (rc < 0) return rc;
    *now_ms = v[0];
    *now_slot_base = s->kind == SCHEDULE_CRON ? v[1] : (v[0] >= 0 ? v[0] / 1000 : -((999 - v[0]) / 1000));
    return 0;
}

int schedule_slot_text(struct db *db, const struct cfg_schedule *s, int64_t instant_ms, char out[40]) {
    bool utc = s->kind == SCHEDULE_EVERY || strcmp(s->timezone, "UTC") == 0;
    char ms[24];
    snprintf(ms, sizeof ms, "%" PRId64, instant_ms);
    const char *params[] = {ms, utc ? "UTC" : s->timezone};
    PGresult *r = NULL;
    /* 'epoch' plus an interval of milliseconds: an instant, whatever the session's TimeZone */
    int rc = db_exec(db,
                     "SELECT to_char(w, 'YYYY-MM-DD\"T\"HH24:MI:SS'), extract(epoch FROM w - u)::bigint"
                     " FROM (SELECT i AT TIME ZONE $2 AS w, i AT TIME ZONE 'UTC' AS u"
                     " FROM (SELECT 'epoch'::timestamptz + $1::bigint * interval '1 millisecond' AS i) AS x) AS y",
                     2, params, &r);
    if (rc < 0) return rc;
    if (PQntuples(r) != 1 || PQgetisnull(r, 0, 0) || PQgetisnull(r, 0, 1)) {
        PQclear(r);
        return CV_EREFUSED;
    }
    long offset = strtol(PQgetvalue(r, 0, 1), NULL, 10), a = labs(offset);
    if (utc)
        snprintf(out, 40, "%sZ", PQgetvalue(r, 0, 0));
    else
        snprintf(out, 40, "%s%c%02ld:%02ld", PQgetvalue(r, 0, 0), offset < 0 ? '-' : '+', a / 3600, a / 60 % 60);
    PQclear(r);
    return 0;
}
