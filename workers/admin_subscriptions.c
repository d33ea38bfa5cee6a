/* admin_subscriptions.c - conveyor-admin subscriptions [list] | remove NAME |
 * dead NAME | retry NAME EVENT_ID|--all: the durable subscriptions
 * (docs/contract.md section 13) of the registry in Conveyor's database
 * (subscriptions, subscription_dead), counted at once on their brokers
 * (broker_subscription_counts), removed (their broker objects, then the row),
 * and their dead letters listed and handed out again.
 *
 * Where list's figures come from: lag from the broker now (RabbitMQ: the
 * ready messages of its partition queues by passive declares; Redis: the
 * largest of its partition groups' lag + pending, XINFO GROUPS); the oldest
 * age from the broker now on Redis (the oldest unsettled entry's id), and on
 * RabbitMQ from the registry (since a pool's count last saw its queues empty:
 * an upper bound); gap from the broker now (Redis) or as a pool noted it in
 * the registry; everything else, and the dead letters' count, from the
 * registry. When the broker fails mid-way, the rest show the pools' last
 * counts (countedFrom "registry") and the exit status says it.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char sub_usage[] = "usage: conveyor-admin subscriptions [list] [--json]\n"
                                "       conveyor-admin subscriptions remove NAME\n"
                                "       conveyor-admin subscriptions dead NAME [--json]\n"
                                "       conveyor-admin subscriptions retry NAME EVENT_ID|--all\n";

/* Prints o as one line and frees it. */
static void put_json(cJSON *o) {
    char *line = cJSON_PrintUnformatted(o);
    if (line) puts(line);
    cJSON_free(line);
    cJSON_Delete(o);
}

/* The broker of transport t, opened once (brokers[t]); NULL with why on
 * stderr and the exit status in *rc when it cannot be. */
static struct broker *broker_for(const struct cfg *cfg, struct broker *brokers[2], enum transport t, int *rc) {
    char err[512];
    int cls = CV_ERETRY;
    if (!brokers[t] && !(brokers[t] = broker_open_class(cfg, t, &cls, err, sizeof err))) {
        fprintf(stderr, "conveyor-admin: subscriptions: %s: %s\n", transport_name(t), err);
        *rc = exit_of_class(cls);
    }
    return brokers[t];
}

/* The one row named name into *row (subscription_rows_free(*row, 1)): 0, or
 * the exit status with why on stderr (2: no such subscription). */
static int one_row(struct db *db, const char *name, struct subscription_row **row) {
    int n;
    if (subscription_rows_read(db, name, row, &n) < 0) {
        fprintf(stderr, "conveyor-admin: subscriptions: %s\n", db_errstr(db));
        return exit_of_class(db_err(db));
    }
    if (n == 1) return 0;
    subscription_rows_free(*row, n);
    *row = NULL;
    fprintf(stderr, "conveyor-admin: no subscription '%s' in the registry (conveyor-admin subscriptions lists them)\n",
            name);
    return EXIT_USAGE;
}

/* One subscription's line(s); counted: its lag and age come from the broker now. */
static void print_row(const struct subscription_row *s, bool counted, long consumers, bool json) {
    if (json) {
        cJSON *o = subscription_row_json(s);
        cJSON_AddStringToObject(o, "kind", "subscription");
        cJSON_AddStringToObject(o, "countedFrom", counted ? "broker" : "registry");
        if (consumers >= 0) cJSON_AddNumberToObject(o, "consumers", (double)consumers);
        put_json(o);
        return;
    }
    printf("subscription %s: %s, %d partition%s, patterns", s->name, s->transport, s->partitions,
           s->partitions == 1 ? "" : "s");
    for (int k = 0; k < s->npatterns; k++) printf(" %s", s->patterns[k]);
    printf(", from %s, created %s, last seen %s\n", s->start_from, s->created_at,
           s->last_seen_at ? s->last_seen_at : "never");
    char lag[32] = "not counted yet", age[64] = "";
    if (s->lag >= 0) snprintf(lag, sizeof lag, "%ld event%s", s->lag, s->lag == 1 ? "" : "s");
    if (s->lag > 0 && s->oldest_age_s >= 0)
        snprintf(age, sizeof age, ", the oldest %s%.1f s old", strcmp(s->transport, "rabbitmq") == 0 ? "at most " : "",
                 s->oldest_age_s);
    printf("  lag %s (%s)%s, %s, %ld dead letter%s", lag, counted ? "counted now" : "the pools' last count", age,
           s->gap ? "a gap (the stream was trimmed past unread entries)" : "no gap", s->dead, s->dead == 1 ? "" : "s");
    if (consumers >= 0) printf(", %ld consumer%s", consumers, consumers == 1 ? "" : "s");
    printf("\n");
}

/* subscriptions [list]: every registered subscription, counted now. */
static int sub_list(const struct cfg *cfg, struct db *db, bool json) {
    struct subscription_row *rows;
    int n, rc = 0;
    if (subscription_rows_read(db, NULL, &rows, &n) < 0) {
        fprintf(stderr, "conveyor-admin: subscriptions: %s\n", db_errstr(db));
        return exit_of_class(db_err(db));
    }
    struct broker *brokers[2] = {NULL, NULL};
    for (int i = 0; i < n && rc == 0; i++) { /* every broker before a line is printed */
        enum transport t;
        struct subscription_spec spec;
        if (subscription_row_spec(&rows[i], &t, &spec)) broker_for(cfg, brokers, t, &rc);
    }
    bool down[2] = {false, false}; /* a broker that failed: the rest of its rows show the pools' last counts */
    int later = 0;                 /* the exit status of such a failure, once everything is printed */
    for (int i = 0; i < n && rc == 0; i++) {
        struct subscription_row *s = &rows[i];
        enum transport t = TRANSPORT_RABBITMQ;
        struct subscription_spec spec;
        struct subscription_counts c = {.consumers = -1};
        bool counted = false;
        if (subscription_row_spec(s, &t, &spec) && !down[t]) {
            int failed = broker_subscription_counts(brokers[t], &spec, &c);
            if (failed == 0) {
                counted = true;
                s->lag = c.lag;
                if (t == TRANSPORT_RABBITMQ) s->oldest_age_s = c.lag == 0 ? 0 : s->empty_age_s;
                else s->oldest_age_s = c.oldest_age_s;
                if (c.gap && !s->gap) s->gap = xstrdup("the stream was trimmed past entries a partition had not read");
            } else {
                fprintf(stderr, "conveyor-admin: subscription %s not counted on %s: %s (its figures, and those of "
                                "the next ones there, are the pools' last count)\n",
                        s->name, s->transport, broker_error(brokers[t]));
                down[t] = true;
                later = exit_of_class(failed);
            }
        }
        print_row(s, counted, counted && t == TRANSPORT_RABBITMQ ? c.consumers : -1, json);
    }
    if (n == 0 && !json) printf("no subscription in the registry (conveyor-subscribe --name NAME creates one)\n");
    broker_close(brokers[0]);
    broker_close(brokers[1]);
    subscription_rows_free(rows, n);
    return rc ? rc : later;
}

/* How many processes of name run (they hold its shared advisory lock, 65535)
 * into *k. Returns 0 or the database's error class. */
static int running_processes(struct db *db, const char *name, int *k) {
    const char *p[1] = {name};
    PGresult *r;
    *k = 0;
    int rc = db_exec(db, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
                         "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                         "AND classid = hashtext('conveyor.sub.' || $1)::oid AND objid = 65535",
                     1, p, &r);
    if (rc < 0) return rc;
    *k = atoi(PQgetvalue(r, 0, 0));
    PQclear(r);
    return 0;
}

/* subscriptions remove NAME: refused while processes of it run; else the
 * broker's objects, then the row (its dead letters with it). */
static int sub_remove(const struct cfg *cfg, struct db *db, const char *name) {
    struct subscription_row *s;
    int rc = one_row(db, name, &s);
    if (rc) return rc;
    int running = 0;
    enum transport t;
    struct subscription_spec spec;
    if (running_processes(db, name, &running) < 0) {
        fprintf(stderr, "conveyor-admin: subscription %s: %s\n", name, db_errstr(db));
        rc = exit_of_class(db_err(db));
    } else if (running > 0) {
        fprintf(stderr, "conveyor-admin: subscription %s has %d running process%s: stop %s first\n", name, running,
                running == 1 ? "" : "es", running == 1 ? "it" : "them");
        rc = EXIT_USAGE;
    } else if (!subscription_row_spec(s, &t, &spec)) {
        fprintf(stderr, "conveyor-admin: subscription %s: unknown transport '%s'\n", name, s->transport);
        rc = EXIT_USAGE;
    } else {
        struct broker *brokers[2] = {NULL, NULL};
        struct broker *b = broker_for(cfg, brokers, t, &rc);
        int cls = b ? broker_subscription_remove(b, &spec) : 0;
        if (cls < 0) {
            fprintf(stderr, "conveyor-admin: subscription %s: its objects on %s not removed: %s (the registry keeps "
                            "it: run this again)\n", name, s->transport, broker_error(b));
            rc = exit_of_class(cls);
        }
        broker_close(b);
        const char *p[1] = {name};
        if (rc == 0 && db_exec(db, "DELETE FROM subscriptions WHERE name = $1", 1, p, NULL) < 0) {
            fprintf(stderr, "conveyor-admin: subscription %s: its objects on %s are removed, its row is not: %s\n",
                    name, s->transport, db_errstr(db));
            rc = exit_of_class(db_err(db));
        }
        if (rc == 0)
            printf("removed subscription %s: its %d %s on %s, its registry row and %ld dead letter%s\n", name,
                   s->partitions, t == TRANSPORT_RABBITMQ ? "partition queues and its exchange" : "partition groups",
                   s->transport, s->dead, s->dead == 1 ? "" : "s");
    }
    subscription_rows_free(s, 1);
    return rc;
}

/* subscriptions dead NAME: its dead letters, oldest first. */
static int sub_dead(struct db *db, const char *name, bool json) {
    struct subscription_row *s;
    int rc = one_row(db, name, &s);
    if (rc) return rc;
    subscription_rows_free(s, 1);
    const char *p[1] = {name};
    PGresult *r;
    if (db_exec(db, "SELECT event_id::text, attempts, error, " SQL_RFC3339("dead_at") ", "
                    SQL_RFC3339("retry_requested_at") ", " SQL_RFC3339("claimed_until") ", event "
                    "FROM subscription_dead WHERE subscription = $1 ORDER BY dead_at, event_id", 1, p, &r) < 0) {
        fprintf(stderr, "conveyor-admin: subscription %s: %s\n", name, db_errstr(db));
        return exit_of_class(db_err(db));
    }
    for (int i = 0; i < PQntuples(r); i++) {
        cJSON *ev = cJSON_Parse(PQgetvalue(r, i, 6));
        const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(ev, "type"));
        if (json) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "kind", "subscription_dead");
            cJSON_AddStringToObject(o, "subscription", name);
            cJSON_AddStringToObject(o, "eventId", PQgetvalue(r, i, 0));
            json_add_optional(o, "type", type);
            cJSON_AddNumberToObject(o, "attempts", atof(PQgetvalue(r, i, 1)));
            cJSON_AddStringToObject(o, "error", PQgetvalue(r, i, 2));
            cJSON_AddStringToObject(o, "deadAt", PQgetvalue(r, i, 3));
            json_add_optional(o, "retryRequestedAt", PQgetisnull(r, i, 4) ? NULL : PQgetvalue(r, i, 4));
            json_add_optional(o, "claimedUntil", PQgetisnull(r, i, 5) ? NULL : PQgetvalue(r, i, 5));
            if (ev) cJSON_AddItemToObject(o, "event", ev), ev = NULL;
            else cJSON_AddStringToObject(o, "event", PQgetvalue(r, i, 6));
            put_json(o);
        } else {
            printf("dead %s %s: %s attempt%s, dead at %s: %s%s%s\n", PQgetvalue(r, i, 0), type ? type : "?",
                   PQgetvalue(r, i, 1), strcmp(PQgetvalue(r, i, 1), "1") == 0 ? "" : "s", PQgetvalue(r, i, 3),
                   PQgetvalue(r, i, 2), PQgetisnull(r, i, 4) ? "" : " (retry requested at ",
                   PQgetisnull(r, i, 4) ? "" : PQgetvalue(r, i, 4));
            if (!PQgetisnull(r, i, 4)) printf(")\n");
        }
        cJSON_Delete(ev);
    }
    if (!json && PQntuples(r) == 0) printf("subscription %s has no dead letter\n", name);
    PQclear(r);
    return 0;
}

/* subscriptions retry NAME EVENT_ID|--all: asks its processes to hand them out again. */
static int sub_retry(struct db *db, const char *name, const char *which) {
    bool all = strcmp(which, "--all") == 0;
    char id[ID_LEN + 1];
    if (!all && !id_parse(which, id)) {
        fprintf(stderr, "conveyor-admin: '%s' is not an event id (or --all)\n", which);
        return EXIT_USAGE;
    }
    struct subscription_row *s;
    int rc = one_row(db, name, &s);
    if (rc) return rc;
    subscription_rows_free(s, 1);
    const char *p[2] = {name, all ? NULL : id};
    PGresult *r;
    if (db_exec(db, "WITH asked AS (UPDATE subscription_dead SET retry_requested_at = now(), claimed_until = NULL "
                    "WHERE subscription = $1 AND ($2::uuid IS NULL OR event_id = $2::uuid) RETURNING 1) "
                    "SELECT count(*) FROM asked", 2, p, &r) < 0) {
        fprintf(stderr, "conveyor-admin: subscription %s: %s\n", name, db_errstr(db));
        return exit_of_class(db_err(db));
    }
    long k = strtol(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
    if (k == 0 && !all) printf("subscription %s has no dead letter %s\n", name, id);
    else printf("subscription %s: %ld dead letter%s to be handed out again by its processes\n", name, k,
                k == 1 ? "" : "s");
    return k > 0 ? 0 : EXIT_NONE;
}

int admin_subscriptions(const struct cfg *cfg, char **words, int n, bool json) {
    const char *verb = n >= 2 ? words[1] : "list";
    bool list = strcmp(verb, "list") == 0 && n <= 2, retry = strcmp(verb, "retry") == 0 && n == 4,
         one = (strcmp(verb, "remove") == 0 || strcmp(verb, "dead") == 0) && n == 3;
    if (!list && !retry && !one) {
        fputs(sub_usage, stderr);
        return EXIT_USAGE;
    }
    char err[512];
    int cls = CV_ERETRY;
    struct db *db = db_connect_class(cfg->database_url, &cls, err, sizeof err);
    if (!db) {
        fprintf(stderr, "conveyor-admin: subscriptions needs the database: %s\n", err);
        return exit_of_class(cls);
    }
    int rc = list ? sub_list(cfg, db, json)
             : retry ? sub_retry(db, words[2], words[3])
             : strcmp(verb, "remove") == 0 ? sub_remove(cfg, db, words[2])
                                           : sub_dead(db, words[2], json);
    db_close(db);
    return rc;
}
