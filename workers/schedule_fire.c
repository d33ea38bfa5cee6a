/* schedule_fire.c - fires the slots of the schedules of queues.conf, in the
 * active timekeeper only (one across every pool). A slot's command is parked
 * with the slot's UUIDv5 as its id and the slot's instant as its due time, so
 * the timekeeper's next release publishes it, and a slot fired twice (by two
 * timekeepers, or after a crash between firing and recording) is applied once:
 * its dedup row absorbs the copy. Which slots fire after a time when no pool
 * fired follows the schedule's catch_up (docs/decisions.md, "Schedules").
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Slots looked at in one pass of one schedule: a long catch-up goes on over
 * the next passes. */
#define SLOTS_PER_PASS 1000
/* A schedule is looked at again at least this often (a pause or resume by
 * conveyor-admin is seen within it). */
#define LOOK_EVERY_MS 1000

void schedule_firing_init(struct schedule_firing *f, const struct cfg *cfg) {
    f->n = cfg->nschedules;
    f->look_at = xcalloc((size_t)(f->n ? f->n : 1), sizeof *f->look_at);
}

void schedule_firing_free(struct schedule_firing *f) {
    free(f->look_at);
    f->look_at = NULL;
    f->n = 0;
}

/* The slot after `after` (naive wall seconds or unix seconds), or -1 when none comes. */
static int64_t slot_next(const struct cfg_schedule *s, int64_t after) {
    return s->kind == SCHEDULE_CRON ? cron_next(&s->cron, after) : schedule_every_next(s->every_s, after);
}

/* What one pass found and did, written to the schedule's row. */
struct pass {
    int64_t cursor;          /* the last slot dealt with (fired or skipped) */
    int fired, missed;
    char last_key[SLOT_KEY_MAX];
    char last_id[ID_LEN + 1];
    int64_t last_instant_ms; /* 0: none fired in this pass */
    int64_t next_ms;         /* the next slot's instant, or -1 (none comes, or not computed yet) */
};

/* Parks the command of schedule s with id, due at instant_ms, {{slot}} the
 * instant as the schedule's zone writes it, correlationId corr. A row with
 * that id already parked is left as it is. Returns 0 or an error class. */
static int park_schedule_command(struct db *db, const struct cfg *cfg, const struct cfg_schedule *s, const char *id,
                                 int64_t instant_ms, const char *corr) {
    char text[40], created[32], due[24];
    int rc = schedule_slot_text(db, s, instant_ms, text);
    if (rc < 0) return rc;
    cJSON *payload = schedule_payload(s, text);
    clock_rfc3339(instant_ms, created);
    char *body = envelope_build(id, s->type, payload, corr, created, NULL);
    cJSON_Delete(payload);
    snprintf(due, sizeof due, "%lld", (long long)instant_ms);
    const struct cfg_queue *q = cfg_queue_for(cfg, s->type); /* cfg_load checked that one routes it */
    const char *p[6] = {id, q ? q->name : "", s->type, due, body, s->name};
    rc = db_exec(db, "INSERT INTO parked_commands (id, queue, type, due_at, envelope, reason, schedule) "
                     "VALUES ($1, $2, $3, to_timestamp($4::bigint / 1000.0), $5, 'schedule', $6) "
                     "ON CONFLICT (id) DO NOTHING", 6, p, NULL);
    free(body);
    return rc;
}

/* Parks the command of slot `slot` (instant instant_ms) of s, its id the
 * slot's UUIDv5, and notes it in ps. Returns 0 or an error class. */
static int fire_slot(struct db *db, const struct cfg *cfg, const struct cfg_schedule *s, int64_t slot,
                     int64_t instant_ms, struct pass *ps) {
    char key[SLOT_KEY_MAX], id[ID_LEN + 1], corr[CFG_NAME_MAX + 16];
    schedule_slot_key(s, slot, key);
    schedule_slot_id(s->name, key, id);
    snprintf(corr, sizeof corr, "schedule:%s", s->name);
    int rc = park_schedule_command(db, cfg, s, id, instant_ms, corr);
    if (rc < 0) return rc;
    ps->fired++;
    snprintf(ps->last_key, sizeof ps->last_key, "%s", key);
    snprintf(ps->last_id, sizeof ps->last_id, "%s", id);
    ps->last_instant_ms = instant_ms;
    log_info("schedule %s: fired slot %s (command %s)", s->name, key, id);
    return 0;
}

/* True when a slot at instant_ms is later than its catch-up window at now_ms. */
static bool late(const struct cfg_schedule *s, int64_t instant_ms, int64_t now_ms) {
    return now_ms - instant_ms > s->catch_up_window_s * 1000;
}

/* Deals with the due slots of s after ps->cursor, at most SLOTS_PER_PASS:
 * fires those on time, and those late as catch_up says (all: every one; last:
 * the newest of a run of late ones; none: none), counting the others missed.
 * Sets ps->next_ms when it reached a slot still to come. Returns 0 or an error class. */
static int deal_with_slots(struct db *db, const struct cfg *cfg, const struct cfg_schedule *s, int64_t now_ms,
                           struct pass *ps) {
    for (int i = 0; i < SLOTS_PER_PASS; i++) {
        int64_t slot = slot_next(s, ps->cursor), instant = 0;
        if (slot < 0) return 0; /* no slot comes any more */
        int rc = schedule_slot_instant(db, s, slot, &instant);
        if (rc < 0) return rc;
        if (instant > now_ms) {
            ps->next_ms = instant;
            return 0;
        }
        bool fire = !late(s, instant, now_ms) || s->catch_up == CATCH_UP_ALL;
        if (!fire && s->catch_up == CATCH_UP_LAST) { /* the newest late one: the next is on time or to come */
            int64_t after = slot_next(s, slot), after_instant = 0;
            if (after >= 0 && (rc = schedule_slot_instant(db, s, after, &after_instant)) < 0) return rc;
            fire = after < 0 || !late(s, after_instant, now_ms);
        }
        if (fire && (rc = fire_slot(db, cfg, s, slot, instant, ps)) < 0) return rc;
        if (!fire) ps->missed++;
        ps->cursor = slot;
    }
    return 0;
}

/* Records ps in the row of s (created before). Returns 0 or an error class. */
static int record_pass(struct db *db, const struct cfg_schedule *s, const struct pass *ps) {
    char cursor[24], fired[16], missed[16], last_at[24], next_at[24];
    snprintf(cursor, sizeof cursor, "%lld", (long long)ps->cursor);
    snprintf(fired, sizeof fired, "%d", ps->fired);
    snprintf(missed, sizeof missed, "%d", ps->missed);
    snprintf(last_at, sizeof last_at, "%lld", (long long)ps->last_instant_ms);
    snprintf(next_at, sizeof next_at, "%lld", (long long)ps->next_ms);
    const char *p[8] = {s->name, cursor, fired, missed, ps->last_instant_ms ? ps->last_key : NULL,
                        ps->last_instant_ms ? last_at : NULL, ps->last_instant_ms ? ps->last_id : NULL, next_at};
    return db_exec(db, "UPDATE schedules SET cursor = $2::bigint, fired = fired + $3::int, missed = missed + $4::int, "
                       "last_slot = coalesce($5, last_slot), "
                       "last_slot_at = coalesce(to_timestamp($6::bigint / 1000.0), last_slot_at), "
                       "last_command_id = coalesce($7::uuid, last_command_id), "
                       "next_slot_at = CASE WHEN $8::bigint < 0 THEN NULL ELSE to_timestamp($8::bigint / 1000.0) END, "
                       "updated_at = now() WHERE name = $1",
                   8, p, NULL);
}

/* One pass of schedule s in one transaction: its row read and locked (made
 * on first sight, with its cursor at now: a new schedule fires from its next
 * slot on), its due slots dealt with, its row written. A paused schedule only
 * moves its cursor to now: slots of a pause are neither fired nor missed.
 * *next_ms: its next slot's instant, or -1. Returns fired slots, or an error class. */
static int fire_schedule(struct db *db, const struct cfg *cfg, const struct cfg_schedule *s, int64_t *next_ms) {
    int64_t base = 0, now_ms = 0;
    PGresult *r = NULL;
    const char *p[2] = {s->name, NULL};
    int rc = db_cmd(db, "BEGIN");
    if (rc == 0) rc = schedule_wall_now(db, s, &base, &now_ms);
    char base_text[24];
    snprintf(base_text, sizeof base_text, "%lld", (long long)base);
    p[1] = base_text;
    if (rc == 0)
        rc = db_exec(db, "INSERT INTO schedules (name, cursor) VALUES ($1, $2::bigint) ON CONFLICT (name) DO NOTHING",
                     2, p, NULL);
    if (rc == 0) rc = db_exec(db, "SELECT paused, cursor FROM schedules WHERE name = $1 FOR UPDATE", 1, p, &r);
    struct pass ps = {.cursor = base, .next_ms = -1};
    bool paused = rc == 0 && PQntuples(r) == 1 && PQgetvalue(r, 0, 0)[0] == 't';
    if (rc == 0 && PQntuples(r) == 1 && !PQgetisnull(r, 0, 1) && !paused) ps.cursor = atoll(PQgetvalue(r, 0, 1));
    PQclear(r);
    if (rc == 0 && !paused) rc = deal_with_slots(db, cfg, s, now_ms, &ps);
    if (rc == 0 && ps.next_ms < 0 && !paused) { /* capped by SLOTS_PER_PASS, or none comes: look again soon */
        int64_t slot = slot_next(s, ps.cursor);
        if (slot >= 0) rc = schedule_slot_instant(db, s, slot, &ps.next_ms);
    }
    if (rc == 0) rc = record_pass(db, s, &ps);
    if (rc == 0) rc = db_cmd(db, "COMMIT");
    if (rc < 0) {
        log_warn("schedule %s: %s; trying again", s->name, db_errstr(db));
        (void)db_cmd(db, "ROLLBACK"); /* fails only with the connection, which rolls back too */
        return rc;
    }
    if (ps.missed) log_warn("schedule %s: %d slot%s missed (catch_up %s)", s->name, ps.missed,
                            ps.missed == 1 ? "" : "s", s->catch_up == CATCH_UP_NONE ? "none" : "last");
    *next_ms = ps.next_ms < 0 ? -1 : ps.next_ms > now_ms ? ps.next_ms - now_ms : 0;
    return ps.fired;
}

int schedule_fire_due(struct db *db, const struct cfg *cfg, struct schedule_firing *f) {
    int total = 0, first_error = 0;
    for (int i = 0; i < cfg->nschedules && i < f->n; i++) {
        int64_t mono = clock_mono_ms();
        if (f->look_at[i] > mono) continue;
        int64_t wait_ms = -1;
        int n = fire_schedule(db, cfg, &cfg->schedules[i], &wait_ms);
        if (n < 0) {
            if (!first_error) first_error = n;
            f->look_at[i] = mono + LOOK_EVERY_MS;
            if (!db_ok(db)) break;
            continue;
        }
        total += n;
        /* at the next slot, and at least every LOOK_EVERY_MS */
        f->look_at[i] = mono + (wait_ms >= 0 && wait_ms < LOOK_EVERY_MS ? wait_ms : LOOK_EVERY_MS);
    }
    return first_error ? first_error : total;
}

int schedule_run_now(struct db *db, const struct cfg *cfg, const struct cfg_schedule *s, char id[ID_LEN + 1]) {
    char corr[CFG_NAME_MAX + 16];
    int64_t base, now_ms;
    id_new(id);
    snprintf(corr, sizeof corr, "schedule:%s:run", s->name);
    const char *p[1] = {s->name};
    int rc = db_cmd(db, "BEGIN");
    if (rc == 0) rc = schedule_wall_now(db, s, &base, &now_ms);
    if (rc == 0) rc = park_schedule_command(db, cfg, s, id, now_ms, corr);
    if (rc == 0)
        rc = db_exec(db, "INSERT INTO schedules (name, runs) VALUES ($1, 1) "
                         "ON CONFLICT (name) DO UPDATE SET runs = schedules.runs + 1, updated_at = now()", 1, p, NULL);
    if (rc == 0) rc = db_cmd(db, "COMMIT");
    if (rc < 0) (void)db_cmd(db, "ROLLBACK"); /* fails only with the connection, which rolls back too */
    return rc;
}

