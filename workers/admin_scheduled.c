/* admin_scheduled.c - conveyor-admin's commands that wait for their time:
 * `scheduled list` and `scheduled cancel` (the parked commands,
 * parked_view.c) and `schedules` list, pause and resume (schedule_view.c).
 * admin.c parses the words and opens the database; this file prints.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Prints o as one JSON line on stdout and frees it. */
static void json_line(cJSON *o) {
    char *s = cJSON_PrintUnformatted(o);
    puts(s);
    free(s);
    cJSON_Delete(o);
}

/* A failed statement on stderr (what failed, and the schema hint for 42P01); the exit status. */
static int db_failed(struct db *db, const char *what, int rc) {
    fprintf(stderr, "conveyor-admin: cannot %s: %s%s\n", what, db_errstr(db),
            strcmp(db_sqlstate(db), "42P01") == 0 ? " (the schema is older: run conveyor-workers --setup)" : "");
    return exit_of_class(rc);
}

/* The queues' counts (only: that queue's; NULL: all), a table or {kind "queue", queue, parked, nextDueAt}. */
static void print_counts(const struct cfg *cfg, const struct parked_queue_stat *st, const char *only, bool json) {
    if (!json) printf("%-16s %8s  %s\n", "QUEUE", "PARKED", "NEXT DUE");
    for (int i = 0; i < cfg->nqueues; i++) {
        const char *name = cfg->queues[i].name;
        if (only && strcmp(only, name) != 0) continue;
        if (!json) {
            printf("%-16s %8ld  %s\n", name, st[i].count, st[i].next_due[0] ? st[i].next_due : "-");
            continue;
        }
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "kind", "queue");
        cJSON_AddStringToObject(o, "queue", name);
        cJSON_AddNumberToObject(o, "parked", (double)st[i].count);
        json_add_optional(o, "nextDueAt", st[i].next_due[0] ? st[i].next_due : NULL);
        json_line(o);
    }
}

/* A page's rows, a table or {kind "parked", ...} with nextCursor on the last row when there is a next page. */
static void print_page(const struct parked_page *p, bool json) {
    if (!json && p->n)
        printf("\n%-36s %-12s %-14s %-8s %-16s %-24s %s\n", "ID", "QUEUE", "TYPE", "REASON", "SCHEDULE", "DUE AT",
               "PARKED AT");
    for (int i = 0; i < p->n; i++) {
        const struct parked_row *r = &p->rows[i];
        if (!json) {
            printf("%-36s %-12s %-14.14s %-8s %-16.16s %-24s %s\n", r->id, r->queue, r->type, r->reason,
                   r->schedule[0] ? r->schedule : "-", r->due_at[0] ? r->due_at : "after its key", r->parked_at);
            continue;
        }
        cJSON *o = parked_row_json(r);
        cJSON_AddStringToObject(o, "kind", "parked");
        if (p->next[0] && i == p->n - 1) cJSON_AddStringToObject(o, "nextCursor", p->next);
        json_line(o);
    }
}

int admin_scheduled_list(struct db *db, const struct cfg *cfg, const char *queue, const char *cursor, int limit,
                         bool json) {
    struct parked_queue_stat *st = xcalloc((size_t)cfg->nqueues + 1, sizeof *st);
    struct parked_page p;
    char err[512];
    int rc = parked_counts(db, cfg, st);
    if (rc < 0) {
        free(st);
        return db_failed(db, "count the parked commands", rc);
    }
    rc = parked_page_read(db, queue, cursor, limit, &p, err, sizeof err);
    if (rc < 0) {
        free(st);
        fprintf(stderr, "conveyor-admin: %s\n", err);
        return rc == CV_ERETRY ? EXIT_UNREACHABLE : EXIT_USAGE;
    }
    print_counts(cfg, st, queue, json);
    print_page(&p, json);
    if (p.next[0])
        fprintf(stderr, "conveyor-admin: %d shown; next page: scheduled list%s%s --cursor %s%s\n", p.n,
                queue ? " " : "", queue ? queue : "", p.next, limit != PARKED_PAGE_DEFAULT ? " --limit N" : "");
    parked_page_free(&p);
    free(st);
    return 0;
}

int admin_scheduled_cancel(struct db *db, const struct cfg *cfg, const char *id, const char *by, bool json) {
    struct parked_cancel c;
    int rc = parked_cancel(db, cfg, id, &c);
    if (rc < 0 && strcmp(db_sqlstate(db), "55P03") == 0) {
        fprintf(stderr, "conveyor-admin: %s is locked (the timekeeper may be publishing it now): nothing cancelled; "
                        "try again\n", id);
        return EXIT_UNREACHABLE;
    }
    if (rc < 0) return db_failed(db, "cancel the parked command", rc);
    static const char *const outcome[] = {"not parked", "already ran", "cancelled"}; /* by enum parked_cancel_outcome */
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "id", id);
        cJSON_AddStringToObject(o, "outcome", outcome[c.outcome]);
        json_add_optional(o, "queue", c.queue[0] ? c.queue : NULL);
        json_add_optional(o, "type", c.type[0] ? c.type : NULL);
        json_add_optional(o, "eventId", c.event_id[0] ? c.event_id : NULL);
        json_add_optional(o, "ranOutcome", c.ran_outcome[0] ? c.ran_outcome : NULL);
        json_add_optional(o, "processedAt", c.processed_at[0] ? c.processed_at : NULL);
        json_line(o);
    }
    switch (c.outcome) {
    case PARKED_CANCELLED:
        log_info("parked command %s (%s, queue %s) cancelled by %s", id, c.type, c.queue, by);
        if (!json)
            printf("cancelled %s (%s, queue %s): it will not run; command.rejected (CANCELLED) goes out through the "
                   "outbox\n", id, c.type, c.queue);
        return 0;
    case PARKED_ALREADY_RAN:
        fprintf(stderr, "conveyor-admin: %s already ran (%s at %s): nothing cancelled\n", id, c.ran_outcome,
                c.processed_at);
        return EXIT_NONE;
    default:
        fprintf(stderr, "conveyor-admin: no parked command with id %s (it may be on its way in a queue, published "
                        "when due and not taken yet: nothing cancelled)\n", id);
        return EXIT_NONE;
    }
}

/* How s fires, for people: "cron 0 3 * * * (Europe/Paris)" or "every 300 s" (into out, n bytes). */
static void when_of(const struct cfg_schedule *s, char *out, size_t n) {
    if (s->kind == SCHEDULE_EVERY) snprintf(out, n, "every %lld s", (long long)s->every_s);
    else snprintf(out, n, "cron %s (%s)", s->cron_text ? s->cron_text : "?", s->timezone[0] ? s->timezone : "UTC");
}

int admin_schedules_list(struct db *db, const struct cfg *cfg, bool json) {
    struct schedule_state *st = xcalloc((size_t)cfg->nschedules + 1, sizeof *st);
    int rc = schedule_states_read(db, cfg, st);
    if (rc < 0) {
        free(st);
        return db_failed(db, "read the schedules", rc);
    }
    if (!json)
        printf("%-20s %-14s %-7s %-40s %-24s %-20s %-8s %6s %6s %5s\n", "SCHEDULE", "TYPE", "STATE", "WHEN", "NEXT",
               "LAST SLOT", "OUTCOME", "FIRED", "MISSED", "RUNS");
    for (int i = 0; i < cfg->nschedules; i++) {
        if (json) {
            json_line(schedule_state_json(&st[i]));
            continue;
        }
        char when[96];
        when_of(st[i].s, when, sizeof when);
        printf("%-20s %-14.14s %-7s %-40.40s %-24s %-20s %-8s %6lld %6lld %5lld\n", st[i].s->name, st[i].s->type,
               st[i].paused ? "paused" : "active", when, st[i].next_slot_at[0] ? st[i].next_slot_at : "-",
               st[i].last_slot[0] ? st[i].last_slot : "-", st[i].last_outcome[0] ? st[i].last_outcome : "-",
               st[i].fired, st[i].missed, st[i].runs);
    }
    for (int i = 0; !json && i < cfg->nschedules; i++)
        if (st[i].paused) printf("%s paused since %s by %s\n", st[i].s->name, st[i].updated_at, st[i].updated_by);
    if (!json && cfg->nschedules == 0) printf("(no schedules in %s)\n", cfg->path);
    free(st);
    return 0;
}

int admin_schedules_pause(struct db *db, const struct cfg *cfg, const char *name, bool pause, const char *by) {
    int rc = schedule_pause_set(db, cfg, name, pause, by);
    if (rc == CV_EREJECT) {
        fprintf(stderr, "conveyor-admin: no schedule '%s' in %s\n", name, cfg->path);
        return EXIT_USAGE;
    }
    if (rc < 0) return db_failed(db, pause ? "pause the schedule" : "resume the schedule", rc);
    log_info("schedule %s %s by %s", name, pause ? "paused" : "resumed", by);
    if (pause) printf("paused schedule %s: the timekeeper fires no slot of it until 'schedules resume %s'\n", name, name);
    else printf("resumed schedule %s\n", name);
    return 0;
}

int admin_schedules_run(struct db *db, const struct cfg *cfg, const char *name, const char *by, bool json) {
    const struct cfg_schedule *s = NULL;
    for (int i = 0; i < cfg->nschedules && !s; i++)
        if (strcmp(cfg->schedules[i].name, name) == 0) s = &cfg->schedules[i];
    if (!s) {
        fprintf(stderr, "conveyor-admin: no schedule '%s' in %s\n", name, cfg->path);
        return EXIT_USAGE;
    }
    char id[ID_LEN + 1];
    int rc = schedule_run_now(db, cfg, s, id);
    if (rc < 0) return db_failed(db, "run the schedule", rc);
    log_info("schedule %s run by %s: command %s", name, by, id);
    if (json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "schedule", name);
        cJSON_AddStringToObject(o, "id", id);
        json_line(o);
    } else {
        printf("%s\n", id);
    }
    return 0;
}

