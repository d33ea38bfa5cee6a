/* subscription_bench.c - conveyor-bench-subscription: one process of a durable
 * subscription (docs/contract.md section 13) through the public C API
 * (conveyor.h: conveyor_subscription_open / _next / _ack), handling each event
 * the way section 12 tells a subscriber to: in one transaction of the
 * subscriber's own PostgreSQL, SELECT conveyor.consume(name, event id), and when
 * it returns true the event's effect (an UPDATE of a read model), COMMIT, then
 * the ack. --no-inbox: the same loop with no database, only the ack (what the
 * inbox costs is the difference). bench/subscription.py runs it.
 *
 *   conveyor-bench-subscription -c queues.conf --name NAME --create [--transport T] [--partitions N]
 *   conveyor-bench-subscription -c queues.conf --name NAME --database URL [--transport T]
 *                               [--idle-ms 5000] [--start-ms 60000] [--count N] [--no-inbox]
 *
 * --create opens the subscription (created at the first open, --from newest,
 * patterns "#") and closes it at once: it then collects events while no process
 * runs. Otherwise it handles events until --count of them (0: no limit), until
 * --idle-ms passed with no event after the first one, until --start-ms passed
 * with none at all, or until SIGTERM/SIGINT; then closes the subscription and
 * prints one JSON object: events handled, applied (consume returned true),
 * duplicates (false), broker errors, the wall-clock ms of its start (before
 * the open), of the first event and of the last ack, and events/s from its
 * start to the last ack. Exit 0 when it ran, 1 on an error, 2 on bad arguments.
 *
 * The read model is the subscriber database's table bench_stock (subscription
 * text, product_id uuid, primary key both; stock bigint, events bigint,
 * reordered bigint: a stock.updated whose previousStock was not the stock
 * held, i.e. an aggregate's events out of commit order), whose rows of the
 * subscription the caller fills with the products' stock before the backlog
 * is made. */
#include "conveyor.h"

#include <getopt.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static volatile sig_atomic_t stop_requested;

/* SIGTERM, SIGINT: the loop stops after the event in hand, closes and prints. */
static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

/* Wall-clock milliseconds (the runs of two processes are compared on it). */
static long long wall_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Monotonic milliseconds (timeouts). */
static long long mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The statements, prepared once on the subscriber's connection; 0 or -1 (the
 * message on stderr). The UPDATE takes the event's JSON and counts an event
 * whose previousStock is not the stock the read model holds (an aggregate's
 * events applied out of order). */
static int prepare(PGconn *pg) {
    static const char *const stmts[][2] = {
        {"consume", "SELECT conveyor.consume($1, $2::uuid)"},
        {"apply", "UPDATE bench_stock SET stock = ($2::jsonb->'data'->>'stock')::bigint, events = events + 1, "
                  "reordered = reordered + (stock IS DISTINCT FROM ($2::jsonb->'data'->>'previousStock')::bigint)::int "
                  "WHERE subscription = $3 AND product_id = $1::uuid"},
    };
    for (size_t i = 0; i < sizeof stmts / sizeof stmts[0]; i++) {
        PGresult *r = PQprepare(pg, stmts[i][0], stmts[i][1], 0, NULL);
        bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        if (!ok) fprintf(stderr, "conveyor-bench-subscription: prepare %s: %s", stmts[i][0], PQerrorMessage(pg));
        PQclear(r);
        if (!ok) return -1;
    }
    return 0;
}

/* Runs one command without parameters; 0 or -1 (the message on stderr). */
static int exec_simple(PGconn *pg, const char *sql) {
    PGresult *r = PQexec(pg, sql);
    bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
    if (!ok) fprintf(stderr, "conveyor-bench-subscription: %s: %s", sql, PQerrorMessage(pg));
    PQclear(r);
    return ok ? 0 : -1;
}

/* The event's effect in one transaction with its inbox row: 1 applied, 0 a
 * duplicate (consume returned false), -1 on a database error (rolled back). */
static int handle(PGconn *pg, const char *name, const conveyor_event *ev) {
    if (exec_simple(pg, "BEGIN") < 0) return -1;
    const char *p[2] = {name, ev->id};
    PGresult *r = PQexecPrepared(pg, "consume", 2, p, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, "conveyor-bench-subscription: consume: %s", PQerrorMessage(pg));
        PQclear(r);
        exec_simple(pg, "ROLLBACK");
        return -1;
    }
    bool first = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    if (first && strcmp(ev->type, "stock.updated") == 0) {
        const char *q[3] = {ev->aggregate_id, ev->json, name};
        r = PQexecPrepared(pg, "apply", 3, q, NULL, NULL, 0);
        bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
        if (!ok) fprintf(stderr, "conveyor-bench-subscription: apply: %s", PQerrorMessage(pg));
        PQclear(r);
        if (!ok) {
            exec_simple(pg, "ROLLBACK");
            return -1;
        }
    }
    if (exec_simple(pg, "COMMIT") < 0) return -1;
    return first ? 1 : 0;
}

/* The synopsis, on f. */
static void usage(FILE *f) {
    fprintf(f, "usage: conveyor-bench-subscription -c CONFIG --name NAME --create [--transport T] [--partitions N]\n"
               "       conveyor-bench-subscription -c CONFIG --name NAME (--database URL | --no-inbox) [--transport T]\n"
               "                                   [--idle-ms MS] [--start-ms MS] [--count N]\n");
}

/* Exit 0 when it ran (or --create made the subscription), 1 on an error (the
 * subscription, the database, or more than 100 broker errors), 2 on bad arguments. */
int main(int argc, char **argv) {
    const char *config = "queues.conf", *name = NULL, *transport = NULL, *database = NULL;
    bool create = false, no_inbox = false;
    int partitions = 0;
    long idle_ms = 5000, first_wait_ms = 60000, count = 0;
    static const struct option opts[] = {
        {"config", required_argument, 0, 'c'},    {"name", required_argument, 0, 'N'},
        {"transport", required_argument, 0, 'T'}, {"database", required_argument, 0, 'D'},
        {"create", no_argument, 0, 'C'},          {"no-inbox", no_argument, 0, 'I'},
        {"partitions", required_argument, 0, 'P'}, {"idle-ms", required_argument, 0, 'i'},
        {"start-ms", required_argument, 0, 's'},  {"count", required_argument, 0, 'n'},
        {"help", no_argument, 0, 'h'},            {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "c:n:h", opts, NULL)) != -1) {
        switch (o) {
        case 'c': config = optarg; break;
        case 'N': name = optarg; break;
        case 'T': transport = optarg; break;
        case 'D': database = optarg; break;
        case 'C': create = true; break;
        case 'I': no_inbox = true; break;
        case 'P': partitions = atoi(optarg); break;
        case 'i': idle_ms = atol(optarg); break;
        case 's': first_wait_ms = atol(optarg); break;
        case 'n': count = atol(optarg); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!name || optind != argc || (!create && !no_inbox && !database) || idle_ms <= 0 || first_wait_ms <= 0 || count < 0) {
        usage(stderr);
        return 2;
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    PGconn *pg = NULL;
    if (!create && !no_inbox) {
        pg = PQconnectdb(database);
        if (PQstatus(pg) != CONNECTION_OK) {
            fprintf(stderr, "conveyor-bench-subscription: the subscriber's database: %s", PQerrorMessage(pg));
            PQfinish(pg);
            return 1;
        }
        if (prepare(pg) < 0) {
            PQfinish(pg);
            return 1;
        }
    }
    long long start_ms = wall_ms(); /* before the open: a drain's time includes connecting and taking partitions */
    struct conveyor_subscription_options so = {.size = sizeof so, .from = "newest", .partitions = partitions,
                                               .transport = transport};
    char err[1024];
    int code = 0;
    conveyor_subscription *s = conveyor_subscription_open(config, name, NULL, &so, err, sizeof err, &code);
    if (!s) {
        fprintf(stderr, "conveyor-bench-subscription: open %s: %s (code %d)\n", name, err, code);
        PQfinish(pg);
        return 1;
    }
    if (create) {
        conveyor_subscription_close(s);
        return 0;
    }

    long events = 0, applied = 0, duplicates = 0, broker_errors = 0;
    long long first_ms = 0, last_ms = 0, started = mono_ms(), last_event = 0;
    int rc = 0;
    while (!stop_requested && (count == 0 || events < count)) {
        conveyor_event *ev = NULL;
        if (conveyor_subscription_next(s, 200, &ev) < 0) {
            fprintf(stderr, "conveyor-bench-subscription: next: %s\n", conveyor_subscription_error(s));
            if (++broker_errors > 100) {
                rc = 1;
                break;
            }
            continue;
        }
        long long now = mono_ms();
        if (!ev) {
            if (last_event ? now - last_event >= idle_ms : now - started >= first_wait_ms) break;
            continue;
        }
        if (!first_ms) first_ms = wall_ms();
        if (pg) {
            int h = handle(pg, name, ev);
            if (h < 0) { /* the database failed: the event comes again */
                conveyor_subscription_nack(s, ev, "the subscriber's database failed");
                rc = 1;
                break;
            }
            if (h) applied++;
            else duplicates++;
        }
        if (conveyor_subscription_ack(s, ev) < 0) {
            fprintf(stderr, "conveyor-bench-subscription: ack: %s\n", conveyor_subscription_error(s));
            broker_errors++;
        }
        events++;
        last_ms = wall_ms();
        last_event = mono_ms();
    }
    conveyor_subscription_close(s);
    PQfinish(pg);
    double secs = last_ms > start_ms ? (double)(last_ms - start_ms) / 1000.0 : 0;
    printf("{\"name\": \"%s\", \"inbox\": %s, \"events\": %ld, \"applied\": %ld, \"duplicates\": %ld, "
           "\"brokerErrors\": %ld, \"startMs\": %lld, \"firstMs\": %lld, \"lastMs\": %lld, \"seconds\": %.3f, "
           "\"eventsPerSecond\": %.1f}\n",
           name, no_inbox ? "false" : "true", events, applied, duplicates, broker_errors, start_ms, first_ms, last_ms,
           secs, secs > 0 && events ? (double)events / secs : 0.0);
    return rc;
}
