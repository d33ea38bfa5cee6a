/* admin.c - conveyor-admin: see, retry and purge dead letters, on both
 * transports; see what every queue holds and how fast it goes (stats); pause
 * and resume a queue for every pool (queue); the commands parked until their
 * time and the schedules (scheduled, schedules: admin_scheduled.c prints). */
#include "workers.h"

#include <getopt.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unistd.h>


static const char usage[] =
    "usage: conveyor-admin [OPTIONS] dead counts\n"
    "       conveyor-admin [OPTIONS] dead list [QUEUE] [--limit N] [--cursor CURSOR]\n"
    "       conveyor-admin [OPTIONS] dead show QUEUE SELECTOR\n"
    "       conveyor-admin [OPTIONS] dead retry QUEUE SELECTOR|--all\n"
    "       conveyor-admin [OPTIONS] dead purge QUEUE SELECTOR|--all\n"
    "       conveyor-admin [OPTIONS] stats [QUEUE]\n"
    "       conveyor-admin [OPTIONS] queue pause QUEUE [NOTE]\n"
    "       conveyor-admin [OPTIONS] queue resume QUEUE\n"
    "       conveyor-admin [OPTIONS] scheduled list [QUEUE] [--limit N] [--cursor C]\n"
    "       conveyor-admin [OPTIONS] scheduled cancel ID\n"
    "       conveyor-admin [OPTIONS] schedules [list]\n"
    "       conveyor-admin [OPTIONS] schedules pause NAME\n"
    "       conveyor-admin [OPTIONS] schedules resume NAME\n"
    "       conveyor-admin [OPTIONS] schedules run NAME\n"
    "       conveyor-admin [OPTIONS] producer install|status [NAME | --database URL]\n"
    "       conveyor-admin [OPTIONS] producer retry ID|--all [NAME | --database URL]\n"
    "       conveyor-admin [OPTIONS] subscriber install|status --database URL\n"
    "       conveyor-admin [OPTIONS] subscriptions [list]\n"
    "       conveyor-admin [OPTIONS] subscriptions remove NAME\n"
    "       conveyor-admin [OPTIONS] subscriptions dead NAME\n"
    "       conveyor-admin [OPTIONS] subscriptions retry NAME EVENT_ID|--all\n"
    "\n"
    "OPTIONS may come before or after the subcommand and its arguments\n"
    "('stats --json' is '--json stats'); after '--' every word is an argument\n"
    "(a NOTE that starts with '-').\n"
    "\n"
    "Dead letters of every queue in FILE (RabbitMQ conveyor.<queue>.dead, Redis\n"
    "conveyor:dead:<queue>). SELECTOR is a command id, or #N for the N-th dead letter\n"
    "of the queue as 'dead list' numbers them (oldest first). 'retry' publishes the\n"
    "original message again, untouched, to the queue it came from, with a fresh\n"
    "attempt count; 'purge' deletes. 'show' prints a message's password fields as\n"
    "\"***\" (the dead letter keeps them, untouched, for the retry).\n"
    "'list' prints a page per queue, at most N letters (default 100, at most 1000);\n"
    "when there are more it says, on stderr, the --cursor of the next page (with\n"
    "QUEUE). No letter is taken off its queue to be read (RabbitMQ: they are read\n"
    "from their index in PostgreSQL, rebuilt from the queue when the two disagree).\n"
    "\n"
    "'stats' prints per queue its state (running or paused), the messages waiting,\n"
    "in flight (RabbitMQ: what the running pools' workers hold, as each reports it\n"
    "every second), waiting out a retry delay, and dead; its consumers\n"
    "(RabbitMQ), and under a bounded queue its max_length (and \"full\"); the\n"
    "commands applied or rejected in the last minute and the last\n"
    "5 minutes (per second); and the outbox: events not yet published, and the age\n"
    "of the oldest; then each rate limit: its tokens now (a keyed limit: its emptiest\n"
    "bucket), the commands parked for a token now, and those that waited or were\n"
    "rejected RATE_LIMITED since it was first used; then each producer of FILE:\n"
    "the commands its outbox holds not yet forwarded, the oldest one's age, and\n"
    "its failed rows, as a forwarder last counted them. 'queue pause' makes every pool stop taking from QUEUE within a\n"
    "second (what is already taken finishes) until 'queue resume'; the state is kept\n"
    "in PostgreSQL (table queue_state), with who changed it, when, and NOTE.\n"
    "\n"
    "'scheduled list' prints per queue the commands parked until their time (a\n"
    "notBefore in the future, a schedule's slot) and when the first is due, then a\n"
    "page of them by due time (at most N, default 100, at most 1000; the --cursor of\n"
    "the next page on stderr). 'scheduled cancel' deletes a parked command before\n"
    "its time: it is recorded rejected, and its command.rejected event (code\n"
    "CANCELLED) is published; 1 when it is not parked (it already ran, or is on its\n"
    "way in its queue). 'schedules' lists the schedules of FILE and their state\n"
    "(paused, the next slot, the last slot and its command's outcome, slots fired\n"
    "and missed, manual runs); 'schedules pause' stops every pool's timekeeper\n"
    "firing NAME's slots until 'schedules resume' (table schedules). 'schedules run'\n"
    "sends NAME's command once now, with an id of its own (printed).\n"
    "\n"
    "'producer install' puts the producer's outbox (schema conveyor: the table\n"
    "conveyor.outbound, the function conveyor.enqueue) into a producer's own\n"
    "PostgreSQL, or brings it up to date, and writes the command types FILE routes\n"
    "(safe to run again). 'producer status' prints its rows pending, failed and\n"
    "forwarded, the age of the oldest pending one, and the failed rows with why;\n"
    "'producer retry' makes failed rows pending again (after a fix to FILE's\n"
    "routing). The database: --database URL, or the NAME of one of FILE's\n"
    "producers (the only one when FILE has one).\n"
    "\n"
    "'subscriber install' puts the subscriber's inbox (the table conveyor.inbox,\n"
    "the function conveyor.consume(subscription, event_id)) into a subscriber's\n"
    "own PostgreSQL, or brings it up to date (safe to run again); 'subscriber\n"
    "status' prints per subscription the events its inbox holds.\n"
    "\n"
    "'subscriptions' lists the durable subscriptions of the registry (Conveyor's\n"
    "table subscriptions): name, transport, patterns, partitions, where it started\n"
    "(from), created, last seen (a process of it last reported), and, counted now on\n"
    "its broker: lag (RabbitMQ: messages ready in its partition queues, by passive\n"
    "declares; Redis: the largest of its partition groups' lag + pending, XINFO\n"
    "GROUPS), the oldest unsettled event's age (Redis: from its stream id, now;\n"
    "RabbitMQ: since a pool's count last saw its queues empty, from the registry: an\n"
    "upper bound), gap (Redis: the stream was trimmed past entries a partition had\n"
    "not read; now, or as a pool noted it), its dead letters (subscription_dead)\n"
    "and, on RabbitMQ, its consumers. A broker that fails mid-way: the rest show the\n"
    "pools' last counts (countedFrom \"registry\"), exit 3. 'subscriptions remove'\n"
    "deletes its broker objects (RabbitMQ: its queues and exchange; Redis: its\n"
    "groups), then its row and dead letters; refused while a process of it runs.\n"
    "'subscriptions dead' lists its dead letters; 'subscriptions retry' asks its\n"
    "processes to hand one (or --all) out again (within a second or so).\n"
    "\n"
    "  -c, --config FILE  configuration (default ./queues.conf)\n"
    "      --json         one JSON object per line (dead counts, dead list, stats,\n"
    "                     scheduled, schedules, subscriptions)\n"
    "      --all          every dead letter of QUEUE: the SELECTOR of retry and purge\n"
    "      --database URL a producer's or subscriber's database (producer ...,\n"
    "                     subscriber ...)\n"
    "  -h, --help         this help\n"
    "\n"
    "Exit status: 0 done, 1 nothing matched the selector (or the ID), 2 usage or\n"
    "configuration error (an unknown queue, schedule or subscription, a bad URL,\n"
    "credentials or a TLS certificate a server refused, a server certificate that is\n"
    "not trusted or not for the host), 3 a broker or the database could not be\n"
    "reached. Nothing is printed on stdout before an error of either kind at start.\n";

struct selector {
    const char *id;        /* a command id (in id_buf), or NULL */
    char id_buf[ID_LEN + 1];
    int index;             /* #N, or 0 */
    bool all;
    struct db *reset_db;      /* retry: reset the attempt count of each chosen command here, first */
    int failed;            /* chosen, but the reset failed: left in the dead letters */
};

static bool choose(const struct dead_letter *d, int index, void *arg) {
    struct selector *s = arg;
    char id[ID_LEN + 1];
    dead_letter_command_id(d, id);
    bool yes = s->all || (s->index && s->index == index) || (s->id && strcmp(s->id, id) == 0);
    if (yes && s->reset_db) {
        /* before the message is back on its queue, or a worker could count on the old attempts */
        if (dead_letter_reset_attempts(s->reset_db, d) < 0) {
            fprintf(stderr, "conveyor-admin: %s left dead: cannot reset its attempt count: %s\n", id, db_errstr(s->reset_db));
            s->failed++;
            return false;
        }
    }
    return yes;
}

static void print_age(long s, char *out, size_t n) {
    if (s < 0) snprintf(out, n, "?");
    else if (s < 120) snprintf(out, n, "%lds", s);
    else if (s < 7200) snprintf(out, n, "%ldm", s / 60);
    else if (s < 172800) snprintf(out, n, "%ldh", s / 3600);
    else snprintf(out, n, "%ldd", s / 86400);
}

static void print_json(cJSON *o, bool pretty) {
    char *s = pretty ? cJSON_Print(o) : cJSON_PrintUnformatted(o);
    puts(s);
    free(s);
    cJSON_Delete(o);
}

/* The broker of queue q's transport, opened once per transport. */
static struct broker *brokers[2];
static struct broker *broker_of(const struct cfg *cfg, const struct cfg_queue *q) {
    char err[512];
    int cls;
    if (!brokers[q->transport] && !(brokers[q->transport] = broker_open_class(cfg, q->transport, &cls, err, sizeof err))) {
        fprintf(stderr, "conveyor-admin: %s\n", err);
        exit(exit_of_class(cls));
    }
    return brokers[q->transport];
}

/* Opens the broker of every queue of cfg (only the one named only, when not
 * NULL) before anything is printed, so that a table never starts with its
 * header and then stops on a configuration or connection error; exits as
 * broker_of does. */
static void open_brokers(const struct cfg *cfg, const char *only) {
    for (int i = 0; i < cfg->nqueues; i++)
        if (!only || strcmp(only, cfg->queues[i].name) == 0) broker_of(cfg, &cfg->queues[i]);
}

/* The database (for RabbitMQ's dead-letter index), opened once, or exit 2 / 3. */
static struct db *index_db;
static struct db *db_or_exit(const struct cfg *cfg, const char *why);
static struct db *index_db_of(const struct cfg *cfg, const struct cfg_queue *q) {
    if (q->transport != TRANSPORT_RABBITMQ) return NULL;
    if (!index_db) index_db = db_or_exit(cfg, "reading RabbitMQ's dead letters (their index)");
    return index_db;
}

/* A page of q's dead letters (cursor, limit) into *p; 0, or an exit status (said on stderr). */
static int read_page(const struct cfg *cfg, const struct cfg_queue *q, const char *cursor, int limit,
                     struct dead_page *p) {
    char err[600];
    int rc = dead_page_read(broker_of(cfg, q), index_db_of(cfg, q), q, cursor, limit, p, err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "conveyor-admin: %s\n", err);
        return exit_of_class(rc);
    }
    return 0;
}

static int cmd_counts(const struct cfg *cfg, bool json) {
    open_brokers(cfg, NULL);
    if (!json) printf("%-16s %-10s %-20s %s\n", "QUEUE", "TRANSPORT", "REASON", "COUNT");
    for (int i = 0; i < cfg->nqueues; i++) {
        const struct cfg_queue *q = &cfg->queues[i];
        cJSON *counts = cJSON_CreateObject();
        char cursor[48] = "";
        long n = 0;
        do { /* every letter, a page at a time, none taken */
            struct dead_page p;
            int rc = read_page(cfg, q, cursor, DEAD_PAGE_MAX, &p);
            if (rc) {
                cJSON_Delete(counts);
                return rc;
            }
            for (int j = 0; j < p.n; j++) {
                const char *r = p.d[j].reason ? p.d[j].reason : "?";
                cJSON *c = cJSON_GetObjectItemCaseSensitive(counts, r);
                if (c) cJSON_SetNumberValue(c, c->valuedouble + 1);
                else cJSON_AddNumberToObject(counts, r, 1);
            }
            n += p.n;
            snprintf(cursor, sizeof cursor, "%s", p.next);
            dead_page_free(&p);
        } while (cursor[0]);
        if (json) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "queue", q->name);
            cJSON_AddStringToObject(o, "transport", transport_name(q->transport));
            cJSON_AddNumberToObject(o, "total", (double)n);
            cJSON_AddItemToObject(o, "byReason", counts);
            print_json(o, false);
        } else {
            if (n == 0) printf("%-16s %-10s %-20s %d\n", q->name, transport_name(q->transport), "-", 0);
            for (cJSON *c = counts->child; c; c = c->next)
                printf("%-16s %-10s %-20s %d\n", q->name, transport_name(q->transport), c->string, (int)c->valuedouble);
            cJSON_Delete(counts);
        }
    }
    return 0;
}

static int cmd_list(const struct cfg *cfg, const char *queue, bool json, const char *cursor, int limit) {
    open_brokers(cfg, queue);
    if (!json) printf("%-10s %4s %-36s %-14s %-18s %4s %5s  %s\n", "QUEUE", "#", "COMMAND ID", "TYPE", "REASON", "TRY", "AGE",
                      "ERROR");
    for (int i = 0; i < cfg->nqueues; i++) {
        const struct cfg_queue *q = &cfg->queues[i];
        if (queue && strcmp(queue, q->name) != 0) continue;
        struct dead_page p;
        int rc = read_page(cfg, q, cursor, limit, &p);
        if (rc) return rc;
        struct dead_letter *d = p.d;
        for (int j = 0; j < p.n; j++) {
            cJSON *o = dead_letter_json(q, &d[j], (int)p.number[j], false);
            if (json) {
                if (p.next[0] && j == p.n - 1) cJSON_AddStringToObject(o, "nextCursor", p.next);
                cJSON_AddNumberToObject(o, "total", (double)p.total);
                print_json(o, false);
                continue;
            }
            char age[16];
            print_age(dead_letter_age_s(&d[j]), age, sizeof age);
            const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "commandId");
            printf("%-10s %4ld %-36s %-14.14s %-18s %4d %5s  %.80s\n", q->name, p.number[j],
                   cJSON_IsString(id) ? id->valuestring : "-", cJSON_GetObjectItem(o, "type")->valuestring,
                   d[j].reason ? d[j].reason : "?", d[j].attempts, age, d[j].error ? d[j].error : "");
            cJSON_Delete(o);
        }
        if (p.next[0])
            fprintf(stderr, "conveyor-admin: %s: %ld to %ld of %ld shown; next page: dead list %s --cursor %s%s\n",
                    q->name, p.offset + 1, p.offset + p.n, p.total, q->name, p.next,
                    limit != DEAD_PAGE_DEFAULT ? " --limit N" : "");
        dead_page_free(&p);
    }
    return 0;
}

/* arg (a command id, #N or --all) into *s: true, or false after saying why on stderr. */
static bool parse_selector(const char *arg, struct selector *s) {
    memset(s, 0, sizeof *s);
    if (strcmp(arg, "--all") == 0) s->all = true;
    else if (arg[0] == '#' && atoi(arg + 1) > 0) s->index = atoi(arg + 1);
    else if (id_parse(arg, s->id_buf)) s->id = s->id_buf;
    else {
        fprintf(stderr, "conveyor-admin: '%s' is not a command id, #N or --all\n", arg);
        return false;
    }
    return true;
}

static int cmd_show(const struct cfg *cfg, const struct cfg_queue *q, struct selector *s) {
    struct dead_page p;
    char err[600];
    int rc = dead_page_find(broker_of(cfg, q), index_db_of(cfg, q), q, s->id, s->index, &p, err, sizeof err), found = 0;
    if (rc < 0) {
        fprintf(stderr, "conveyor-admin: %s\n", err);
        return exit_of_class(rc);
    }
    for (int j = 0; j < p.n; j++) {
        print_json(dead_letter_json(q, &p.d[j], (int)p.number[j], true), true);
        found++;
    }
    dead_page_free(&p);
    if (!found) fprintf(stderr, "conveyor-admin: no such dead letter in %s\n", q->name);
    return found ? 0 : EXIT_NONE;
}

static int cmd_take(const struct cfg *cfg, const struct cfg_queue *q, struct selector *s, bool retry) {
    struct broker *b = broker_of(cfg, q);
    char err[512];
    int cls;
    if (retry && !(s->reset_db = db_connect_class(cfg->database_url, &cls, err, sizeof err))) {
        fprintf(stderr, "conveyor-admin: retrying needs the database (attempt counts): %s\n", err);
        return exit_of_class(cls);
    }
    int count = 0;
    int rc = dead_index_take(b, retry ? s->reset_db : index_db_of(cfg, q), q, choose, s, retry, &count);
    if (rc < 0) fprintf(stderr, "conveyor-admin: %s stopped: %s\n", retry ? "retry" : "purge", broker_error(b));
    db_close(s->reset_db);
    printf("%s %d dead letter%s of %s\n", retry ? "requeued" : "purged", count, count == 1 ? "" : "s", q->name);
    if (rc < 0) return exit_of_class(rc);
    if (s->failed) return EXIT_UNREACHABLE; /* the database failed under the reset (said by choose) */
    return count ? 0 : EXIT_NONE;
}

/* The database, or exit: 2 when it refused the configuration, 3 when it cannot be reached. */
static struct db *db_or_exit(const struct cfg *cfg, const char *why) {
    char err[512];
    int cls;
    struct db *db = db_connect_class(cfg->database_url, &cls, err, sizeof err);
    if (!db) {
        fprintf(stderr, "conveyor-admin: %s needs the database: %s\n", why, err);
        exit(exit_of_class(cls));
    }
    return db;
}

/* Who runs this, for queue_state and the log: user@host. */
static void who_am_i(char *out, size_t n) {
    struct passwd entry, *pw = NULL;
    char buf[1024];
    if (getpwuid_r(geteuid(), &entry, buf, sizeof buf, &pw) != 0) pw = NULL;
    const char *user = getenv("SUDO_USER") ? getenv("SUDO_USER") : pw ? pw->pw_name : getenv("USER");
    char host[64];
    if (gethostname(host, sizeof host) != 0) snprintf(host, sizeof host, "localhost");
    host[sizeof host - 1] = '\0';
    snprintf(out, n, "%s@%s", user ? user : "?", host);
}

/* queue pause|resume: writes queue_state, logs who did it, says what it did. */
static int cmd_queue(const struct cfg *cfg, const struct cfg_queue *q, bool pause, const char *note) {
    struct db *db = db_or_exit(cfg, pause ? "pausing a queue" : "resuming a queue");
    char who[160];
    who_am_i(who, sizeof who);
    int rc = queue_pause_set(db, q->name, pause, who, note);
    if (rc < 0) {
        fprintf(stderr, "conveyor-admin: cannot %s %s: %s%s\n", pause ? "pause" : "resume", q->name, db_errstr(db),
                strcmp(db_sqlstate(db), "42P01") == 0 ? " (the schema is older: run conveyor-workers --setup)" : "");
        db_close(db);
        return exit_of_class(rc);
    }
    db_close(db);
    log_info("queue %s %s by %s%s%s", q->name, pause ? "paused" : "resumed", who, note ? ": " : "", note ? note : "");
    if (pause) printf("paused %s: every pool stops taking from it within a second (what is taken finishes)\n", q->name);
    else printf("resumed %s: every pool takes from it again within a second\n", q->name);
    return 0;
}

/* What stats reads from the database for one queue. */
struct queue_db_stats {
    bool paused;
    char since[32], by[160], note[256];
    long processed_1m, processed_5m;
};

/* Reads the paused state and the recent processed counts of every queue of
 * cfg into st (nqueues entries, zeroed first), and the outbox backlog. Returns
 * 0, or exits 3 (unreachable) / 2 (the schema is older). */
static int read_db_stats(struct db *db, const struct cfg *cfg, struct queue_db_stats *st, long *backlog,
                         double *oldest_s) {
    PGresult *r;
    int rc = db_exec(db, "SELECT queue, paused, " SQL_RFC3339("updated_at") ", updated_by, coalesce(note, '') "
                         "FROM queue_state", 0, NULL, &r);
    if (rc == 0) {
        for (int i = 0; i < PQntuples(r); i++) {
            const struct cfg_queue *q = cfg_queue_named(cfg, PQgetvalue(r, i, 0));
            if (!q) continue; /* a queue the configuration no longer has */
            struct queue_db_stats *s = &st[q - cfg->queues];
            s->paused = PQgetvalue(r, i, 1)[0] == 't';
            snprintf(s->since, sizeof s->since, "%s", PQgetvalue(r, i, 2));
            snprintf(s->by, sizeof s->by, "%s", PQgetvalue(r, i, 3));
            snprintf(s->note, sizeof s->note, "%s", PQgetvalue(r, i, 4));
        }
        PQclear(r);
        /* by the processed_at index (sql/0005): the rows of the last 5 minutes only */
        rc = db_exec(db, "SELECT type, count(*) FILTER (WHERE processed_at > now() - interval '1 minute'), count(*) "
                         "FROM processed_commands WHERE processed_at > now() - interval '5 minutes' GROUP BY type",
                     0, NULL, &r);
    }
    if (rc == 0) {
        for (int i = 0; i < PQntuples(r); i++) {
            const struct cfg_queue *q = cfg_queue_for(cfg, PQgetvalue(r, i, 0));
            if (!q) continue;
            st[q - cfg->queues].processed_1m += atol(PQgetvalue(r, i, 1));
            st[q - cfg->queues].processed_5m += atol(PQgetvalue(r, i, 2));
        }
        PQclear(r);
        rc = db_exec(db, "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), -1) FROM outbox "
                         "WHERE published_at IS NULL", 0, NULL, &r);
    }
    if (rc < 0) {
        fprintf(stderr, "conveyor-admin: cannot read the statistics: %s%s\n", db_errstr(db),
                strcmp(db_sqlstate(db), "42P01") == 0 ? " (the schema is older: run conveyor-workers --setup)" : "");
        return exit_of_class(rc);
    }
    *backlog = atol(PQgetvalue(r, 0, 0));
    *oldest_s = atof(PQgetvalue(r, 0, 1));
    PQclear(r);
    return 0;
}

/* The line under a bounded queue's row of stats: its max_length, and "full" once
 * waiting reaches it (a foreign LPUSH on Redis may take it beyond). */
static void bounded_line(const struct cfg_queue *q, long waiting) {
    printf("  %s: max_length %ld%s\n", q->name, q->max_length,
           waiting >= q->max_length ? " (full: new commands are refused)" : "");
}

/* stats of a queue with lanes: a JSON line (kind "lanes": lane_queue_json),
 * or a line under its row per class: waiting, the deepest lane, the oldest
 * age where it is known (Redis: its lanes' heads; RabbitMQ: what the pools'
 * workers hold: ages, read from their lane_oldest rows, or NULL). A count
 * that fails is said, not fatal. */
static void print_lanes(struct broker *b, const struct lane_count *ages, const struct cfg_queue *q, bool json) {
    struct lane_count *c = xcalloc((size_t)(LANE_CLASSES * q->lanes), sizeof *c);
    if (broker_lane_counts(b, q, c) < 0) {
        fprintf(stderr, "conveyor-admin: cannot count the lanes of %s: %s\n", q->name, broker_error(b));
        free(c);
        return;
    }
    for (int k = 0; ages && k < LANE_CLASSES * q->lanes; k++) c[k].oldest_age_s = ages[k].oldest_age_s;
    cJSON *o = lane_queue_json(q, c);
    free(c);
    if (json) {
        cJSON_AddStringToObject(o, "kind", "lanes");
        print_json(o, false);
        return;
    }
    printf("  %s: %d lanes per class%s;", q->name, q->lanes, q->ordered ? ", ordered" : "");
    const cJSON *k;
    cJSON_ArrayForEach(k, cJSON_GetObjectItem(o, "classes")) {
        long waiting = (long)cJSON_GetObjectItem(k, "waiting")->valuedouble;
        printf(" %s %ld", cJSON_GetObjectItem(k, "class")->valuestring, waiting);
        if (waiting > 0)
            printf(" (deepest %s: %ld)", cJSON_GetObjectItem(k, "deepestLane")->valuestring,
                   (long)cJSON_GetObjectItem(k, "deepestDepth")->valuedouble);
        const cJSON *age = cJSON_GetObjectItem(k, "oldestAgeSeconds");
        if (cJSON_IsNumber(age)) { /* RabbitMQ: also of one held by its worker, not counted waiting */
            char text[16];
            print_age((long)age->valuedouble, text, sizeof text);
            printf(", oldest %s", text);
        }
        printf(";");
    }
    printf("\n");
    cJSON_Delete(o);
}

static void print_count(long n, int width) {
    if (n < 0) printf(" %*s", width, "n/a");
    else printf(" %*ld", width, n);
}

/* stats: the rate limits' state, a table or one JSON object per limit (kind "rate_limit"). */
static void print_rate_limits(const struct rate_limit_state *st, int n, bool json) {
    if (n > 0 && !json)
        printf("%-20s %-10s %6s %-6s %10s %10s %9s %9s  %s\n", "RATE LIMIT", "RATE", "BURST", "OVER", "TOKENS",
               "WAITING", "WAITED", "REJECTED", "KEY");
    for (int i = 0; i < n; i++) {
        if (json) {
            cJSON *o = rate_limit_state_json(&st[i]);
            cJSON_AddStringToObject(o, "kind", "rate_limit");
            print_json(o, false);
            continue;
        }
        const struct cfg_rate_limit *rl = st[i].rl;
        printf("%-20s %-10s %6.0f %-6s %10.1f %10lld %9lld %9lld  %s%s\n", rl->name, rl->rate_text, rl->burst,
               rl->over == RATE_OVER_WAIT ? "wait" : "reject", st[i].tokens, st[i].waiting, st[i].waited,
               st[i].rejected, rl->key ? "payload." : "-", rl->key ? rl->key : "");
    }
}

/* stats: the producers' outboxes (forward_state), a line or one JSON object
 * per producer (kind "forward"); what a forwarder has not counted yet says so. */
static void print_forward(const struct cfg *cfg, const struct forward_state *st, bool json) {
    for (int i = 0; i < cfg->nproducers; i++) {
        if (json) {
            cJSON *o = forward_state_json(&st[i]);
            cJSON_AddStringToObject(o, "kind", "forward");
            print_json(o, false);
        } else if (!st[i].read) {
            printf("producer %s: not counted yet (no forwarder has reached its database)\n", st[i].producer->name);
        } else {
            char age[16] = "", seen[16] = "";
            print_age((long)st[i].oldest_age_s, age, sizeof age);
            print_age((long)st[i].report_age_s, seen, sizeof seen);
            printf("producer %s: %lld command%s waiting to be forwarded%s%s%s, %lld failed (counted %s ago)\n",
                   st[i].producer->name, st[i].pending, st[i].pending == 1 ? "" : "s", st[i].pending ? ", the oldest " : "",
                   st[i].pending ? age : "", st[i].pending ? " old" : "", st[i].failed, seen);
        }
    }
}

/* stats [QUEUE]: per queue what its broker holds, its state and its recent
 * rate; then the outbox. */
static int cmd_stats(const struct cfg *cfg, const struct cfg_queue *only, bool json) {
    struct db *db = db_or_exit(cfg, "stats");
    struct queue_db_stats *st = xcalloc((size_t)cfg->nqueues, sizeof *st);
    long backlog = 0;
    double oldest = -1;
    int rc = read_db_stats(db, cfg, st, &backlog, &oldest);
    /* RabbitMQ's in flight: what the pools' workers hold, as each pool reports it (pool_load.c) */
    long *held = xcalloc((size_t)cfg->nqueues, sizeof *held);
    bool held_known = !rc && pool_load_read(db, cfg, held) == 0;
    struct parked_queue_stat *parked = xcalloc((size_t)cfg->nqueues + 1, sizeof *parked);
    bool parked_known = !rc && parked_counts(db, cfg, parked) == 0; /* n/a with an older schema */
    struct rate_limit_state *limits = xcalloc((size_t)cfg->nrate_limits + 1, sizeof *limits);
    bool limits_known = !rc && rate_limit_states_read(db, cfg, limits) == 0 &&
                        rate_limit_waiting_read(db, cfg, limits) == 0;
    /* RabbitMQ's lanes' oldest ages: what the pools' workers hold (pool_load.c) */
    struct lane_count **ages = xcalloc((size_t)cfg->nqueues + 1, sizeof *ages);
    for (int i = 0; !rc && i < cfg->nqueues; i++) {
        const struct cfg_queue *q = &cfg->queues[i];
        if (q->lanes < 2 || q->transport != TRANSPORT_RABBITMQ || (only && q != only)) continue;
        ages[i] = xcalloc((size_t)(LANE_CLASSES * q->lanes), sizeof **ages);
        for (int k = 0; k < LANE_CLASSES * q->lanes; k++) ages[i][k].oldest_age_s = -1;
        if (pool_load_lane_ages(db, q, ages[i]) < 0) /* unknown: -1 stands */
            fprintf(stderr, "conveyor-admin: cannot read the lanes' oldest of %s: %s\n", q->name, db_errstr(db));
    }
    /* the producers' outboxes, as their forwarders last counted them */
    struct forward_state *fwd = xcalloc((size_t)cfg->nproducers + 1, sizeof *fwd);
    bool fwd_known = !rc && forward_states_read(db, cfg, fwd) == 0;
    if (!rc && !fwd_known) fprintf(stderr, "conveyor-admin: cannot read the producers' outboxes: %s\n", db_errstr(db));
    db_close(db);
    if (!rc) open_brokers(cfg, only ? only->name : NULL);
    if (!rc && !json)
        printf("%-12s %-9s %-7s %8s %9s %6s %6s %7s %9s %9s %9s\n", "QUEUE", "TRANSPORT", "STATE", "WAITING",
               "IN-FLIGHT", "RETRY", "DEAD", "PARKED", "CONSUMERS", "RATE/S 1M", "RATE/S 5M");
    for (int i = 0; !rc && i < cfg->nqueues; i++) {
        const struct cfg_queue *q = &cfg->queues[i];
        if (only && q != only) continue;
        struct broker *b = broker_of(cfg, q);
        struct queue_counts n;
        int counted = broker_queue_counts(b, q, &n);
        if (counted < 0) {
            fprintf(stderr, "conveyor-admin: cannot count the messages of %s: %s\n", q->name, broker_error(b));
            rc = exit_of_class(counted);
            break;
        }
        if (q->transport == TRANSPORT_RABBITMQ) n.in_flight = held_known ? held[i] : -1;
        const struct queue_db_stats *s = &st[i];
        double rate_1m = s->processed_1m / 60.0, rate_5m = s->processed_5m / 300.0;
        if (json) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "kind", "queue");
            cJSON_AddStringToObject(o, "queue", q->name);
            cJSON_AddStringToObject(o, "transport", transport_name(q->transport));
            cJSON_AddBoolToObject(o, "paused", s->paused);
            json_add_optional(o, "stateChangedAt", s->since[0] ? s->since : NULL);
            json_add_optional(o, "stateChangedBy", s->by[0] ? s->by : NULL);
            json_add_optional(o, "note", s->note[0] ? s->note : NULL);
            json_add_number_or_null(o, "waiting", (double)n.waiting); /* -1: the broker cannot tell */
            json_add_number_or_null(o, "inFlight", (double)n.in_flight);
            json_add_number_or_null(o, "retrying", (double)n.retrying);
            json_add_number_or_null(o, "dead", (double)n.dead);
            json_add_number_or_null(o, "parked", parked_known ? (double)parked[i].count : -1);
            json_add_number_or_null(o, "consumers", (double)n.consumers);
            /* a bounded queue's max_length (null: unbounded) */
            json_add_number_or_null(o, "maxLength", q->max_length > 0 ? (double)q->max_length : -1);
            cJSON_AddNumberToObject(o, "processed1m", (double)s->processed_1m);
            cJSON_AddNumberToObject(o, "processed5m", (double)s->processed_5m);
            cJSON_AddNumberToObject(o, "ratePerSecond1m", rate_1m);
            cJSON_AddNumberToObject(o, "ratePerSecond5m", rate_5m);
            print_json(o, false);
            if (q->lanes >= 2) print_lanes(b, ages[i], q, true);
            continue;
        }
        printf("%-12s %-9s %-7s", q->name, transport_name(q->transport), s->paused ? "paused" : "running");
        print_count(n.waiting, 8);
        print_count(n.in_flight, 9);
        print_count(n.retrying, 6);
        print_count(n.dead, 6);
        print_count(parked_known ? parked[i].count : -1, 7);
        print_count(n.consumers, 9);
        printf(" %9.2f %9.2f\n", rate_1m, rate_5m);
        if (q->max_length > 0) bounded_line(q, n.waiting);
        if (q->lanes >= 2) print_lanes(b, ages[i], q, false);
    }
    for (int i = 0; !rc && !json && i < cfg->nqueues; i++)
        if (st[i].paused && (!only || only == &cfg->queues[i]))
            printf("%s paused since %s by %s%s%s\n", cfg->queues[i].name, st[i].since, st[i].by,
                   st[i].note[0] ? ": " : "", st[i].note);
    if (!rc && json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "kind", "outbox");
        cJSON_AddNumberToObject(o, "unpublished", (double)backlog);
        if (oldest < 0) cJSON_AddNullToObject(o, "oldestSeconds");
        else cJSON_AddNumberToObject(o, "oldestSeconds", oldest);
        print_json(o, false);
    } else if (!rc) {
        char age[16] = "";
        if (oldest >= 0) print_age((long)oldest, age, sizeof age);
        printf("outbox: %ld event%s not yet published%s%s%s\n", backlog, backlog == 1 ? "" : "s",
               age[0] ? ", the oldest " : "", age, age[0] ? " old" : "");
    }
    if (!rc && limits_known && !only) print_rate_limits(limits, cfg->nrate_limits, json);
    if (fwd_known && !only) print_forward(cfg, fwd, json);
    free(fwd);
    free(limits);
    free(st);
    free(held);
    for (int i = 0; i < cfg->nqueues; i++) free(ages[i]);
    free(ages);
    free(parked);
    return rc;
}

/* --limit's value (NULL: def) into *limit: true, or false when it is not a number in 1..max. */
static bool parse_limit(const char *arg, int def, int max, int *limit) {
    *limit = def;
    if (!arg) return true;
    char *end;
    long v = strtol(arg, &end, 10);
    *limit = (int)v;
    return *arg && *end == '\0' && v >= 1 && v <= max;
}

/* scheduled list|cancel, schedules [list|pause|resume]: the words a (n of
 * them) checked, the database opened (or exit 2 / 3), then admin_scheduled.c. */
static int cmd_waiting(const struct cfg *cfg, char **a, int n, bool json, const char *limit_arg, const char *cursor) {
    const char *verb = n >= 2 ? a[1] : "list";
    bool scheduled = strcmp(a[0], "scheduled") == 0, pause = strcmp(verb, "pause") == 0,
         run = strcmp(verb, "run") == 0;
    char id[ID_LEN + 1], who[160];
    int limit;
    who_am_i(who, sizeof who);
    if (scheduled && strcmp(verb, "list") == 0) {
        if (n > 3 || !parse_limit(limit_arg, PARKED_PAGE_DEFAULT, PARKED_PAGE_MAX, &limit)) {
            fprintf(stderr, "conveyor-admin: scheduled list [QUEUE] [--limit 1-%d] [--cursor CURSOR]\n", PARKED_PAGE_MAX);
            return EXIT_USAGE;
        }
        if (n == 3 && !cfg_queue_named(cfg, a[2])) {
            fprintf(stderr, "conveyor-admin: no queue '%s' in %s\n", a[2], cfg->path);
            return EXIT_USAGE;
        }
    } else if (scheduled && strcmp(verb, "cancel") == 0 && n == 3) {
        if (!id_parse(a[2], id)) {
            fprintf(stderr, "conveyor-admin: '%s' is not a command id\n", a[2]);
            return EXIT_USAGE;
        }
    } else if (scheduled || !(n == 1 || (strcmp(verb, "list") == 0 && n == 2) ||
                              ((pause || run || strcmp(verb, "resume") == 0) && n == 3))) {
        fputs(usage, stderr);
        return EXIT_USAGE;
    }
    struct db *db = db_or_exit(cfg, scheduled ? "scheduled" : "schedules");
    int rc;
    if (scheduled && strcmp(verb, "list") == 0) rc = admin_scheduled_list(db, cfg, n == 3 ? a[2] : NULL, cursor, limit, json);
    else if (scheduled) rc = admin_scheduled_cancel(db, cfg, id, who, json);
    else if (n == 3 && run) rc = admin_schedules_run(db, cfg, a[2], who, json);
    else if (n == 3) rc = admin_schedules_pause(db, cfg, a[2], pause, who);
    else rc = admin_schedules_list(db, cfg, json);
    db_close(db);
    return rc;
}

/* Long on purpose: the option table, where --all goes back among the words,
 * and the dispatch to one cmd_* function per subcommand, in --help's order. */
int main(int argc, char **argv) {
    const char *path = "queues.conf";
    bool json = false, all = false;
    const char *limit_arg = NULL, *cursor = NULL; /* dead list's page */
    static const struct option opts[] = {{"config", required_argument, 0, 'c'}, {"json", no_argument, 0, 'j'},
                                         {"all", no_argument, 0, 'a'},          {"help", no_argument, 0, 'h'},
                                         {"limit", required_argument, 0, 'l'},  {"cursor", required_argument, 0, 'u'},
                                         {"database", required_argument, 0, 'd'}, {0, 0, 0, 0}};
    const char *database = NULL; /* producer ...: a producer's database */
    int o;
    /* options anywhere: getopt_long permutes them ahead of the words ("stats --json") */
    while ((o = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
        switch (o) {
        case 'c': path = optarg; break;
        case 'j': json = true; break;
        case 'a': all = true; break;
        case 'l': limit_arg = optarg; break;
        case 'u': cursor = optarg; break;
        case 'd': database = optarg; break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return EXIT_USAGE;
        }
    }
    /* the words, with --all back where a SELECTOR goes (after them) */
    int n = argc - optind;
    char **a = xcalloc((size_t)n + 2, sizeof *a);
    memcpy(a, argv + optind, (size_t)n * sizeof *a);
    static char all_word[] = "--all";
    if (all) a[n++] = all_word;
    bool dead = n >= 2 && strcmp(a[0], "dead") == 0, stats = n >= 1 && strcmp(a[0], "stats") == 0,
         queue = n >= 3 && strcmp(a[0], "queue") == 0, scheduled = n >= 2 && strcmp(a[0], "scheduled") == 0,
         schedules = n >= 1 && strcmp(a[0], "schedules") == 0, producer = n >= 1 && strcmp(a[0], "producer") == 0,
         subscriber = n >= 1 && strcmp(a[0], "subscriber") == 0,
         subscriptions = n >= 1 && strcmp(a[0], "subscriptions") == 0;
    /* the two subcommands that take --limit and --cursor */
    bool paged = (dead || scheduled) && strcmp(a[1], "list") == 0;
    if ((!dead && !stats && !queue && !scheduled && !schedules && !producer && !subscriber && !subscriptions) ||
        ((limit_arg || cursor) && !paged) || (database && !producer && !subscriber)) {
        fputs(usage, stderr);
        free(a);
        return EXIT_USAGE;
    }
    log_init("admin");
    if (subscriber) { /* needs no configuration: the subscriber's database only */
        int rc = admin_subscriber(a, n, database, json);
        free(a);
        return rc;
    }
    struct cfg cfg;
    char err[1024];
    if (cfg_load(path, &cfg, err, sizeof err) < 0) {
        fprintf(stderr, "conveyor-admin: %s\n", err);
        free(a);
        return EXIT_USAGE;
    }
    int rc = EXIT_USAGE;
    const char *verb = stats ? "stats" : a[1];
    const struct cfg_queue *q = n >= 3 ? cfg_queue_named(&cfg, a[2]) : NULL;
    struct selector s;
    if (producer) {
        rc = admin_producer(&cfg, a, n, database, json);
    } else if (subscriptions) {
        rc = admin_subscriptions(&cfg, a, n, json);
    } else if (scheduled || schedules) {
        rc = cmd_waiting(&cfg, a, n, json, limit_arg, cursor);
    } else if (stats && n <= 2) {
        const struct cfg_queue *only = n == 2 ? cfg_queue_named(&cfg, a[1]) : NULL;
        if (n == 2 && !only) fprintf(stderr, "conveyor-admin: no queue '%s' in %s\n", a[1], path);
        else rc = cmd_stats(&cfg, only, json);
    } else if (queue && (strcmp(verb, "pause") == 0 ? n <= 4 : strcmp(verb, "resume") == 0 && n == 3)) {
        if (!q) fprintf(stderr, "conveyor-admin: no queue '%s' in %s\n", a[2], path);
        else rc = cmd_queue(&cfg, q, strcmp(verb, "pause") == 0, n == 4 ? a[3] : NULL);
    } else if (stats || queue) {
        fputs(usage, stderr);
    } else if (strcmp(verb, "counts") == 0 && n == 2) {
        rc = cmd_counts(&cfg, json);
    } else if (strcmp(verb, "list") == 0) {
        const char *queue_name = n >= 3 ? a[2] : NULL;
        int limit;
        bool ok = parse_limit(limit_arg, DEAD_PAGE_DEFAULT, DEAD_PAGE_MAX, &limit) && n <= 3 && !all;
        const struct cfg_queue *lq = queue_name ? cfg_queue_named(&cfg, queue_name) : NULL;
        if (!ok) fprintf(stderr, "conveyor-admin: dead list [QUEUE] [--limit 1-%d] [--cursor CURSOR]\n", DEAD_PAGE_MAX);
        else if (queue_name && !lq) fprintf(stderr, "conveyor-admin: no queue '%s' in %s\n", queue_name, path);
        else if (cursor && !lq) fprintf(stderr, "conveyor-admin: --cursor needs the QUEUE it came from\n");
        else rc = cmd_list(&cfg, queue_name, json, cursor, limit);
    } else if ((strcmp(verb, "show") == 0 || strcmp(verb, "retry") == 0 || strcmp(verb, "purge") == 0) && n == 4) {
        if (!q) fprintf(stderr, "conveyor-admin: no queue '%s' in %s\n", a[2], path);
        else if (parse_selector(a[3], &s)) {
            if (strcmp(verb, "show") != 0) rc = cmd_take(&cfg, q, &s, strcmp(verb, "retry") == 0);
            else if (s.all) fprintf(stderr, "conveyor-admin: show takes one dead letter, not --all\n");
            else rc = cmd_show(&cfg, q, &s);
        }
    } else {
        fputs(usage, stderr);
    }
    broker_close(brokers[0]);
    broker_close(brokers[1]);
    db_close(index_db);
    cfg_free(&cfg);
    free(a);
    return rc;
}
