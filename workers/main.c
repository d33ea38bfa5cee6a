/* main.c - conveyor-workers: apply migrations, declare the topology, run the pool. */
#include "workers.h"

#include <getopt.h>
#include <signal.h>
#include <sodium.h>
#include <stdio.h>
#include <string.h>

static const char usage[] =
    "usage: conveyor-workers [-c FILE] [--check | --setup]\n"
    "\n"
    "Runs a Conveyor worker pool: for every queue in FILE its worker processes,\n"
    "plus one outbox relay. Applies pending database migrations first.\n"
    "\n"
    "  -c, --config FILE  configuration (default ./queues.conf)\n"
    "      --check        check the configuration and exit\n"
    "      --setup        apply the migrations, declare the RabbitMQ topology, and exit\n"
    "  -h, --help         this help\n"
    "  -V, --version      print the version\n"
    "\n"
    "Environment: CONVEYOR_DATABASE_URL, CONVEYOR_RABBITMQ_URL, CONVEYOR_REDIS_URL,\n"
    "CONVEYOR_TRANSPORT (rabbitmq|redis), CONVEYOR_EVENTS_TRANSPORT, CONVEYOR_LOG_LEVEL.\n"
    "SIGTERM or SIGINT drains the pool and exits 0; SIGHUP reloads FILE and replaces\n"
    "the workers one by one.\n"
    "\n"
    "Exit status: 0 stopped cleanly, 2 usage or configuration error,\n"
    "3 the database schema could not be migrated.\n";

int main(int argc, char **argv) {
    const char *path = "queues.conf";
    bool check = false, setup_only = false;
    static const struct option opts[] = {{"config", required_argument, 0, 'c'}, {"check", no_argument, 0, 'k'},
                                         {"setup", no_argument, 0, 's'},
                                         {"help", no_argument, 0, 'h'},         {"version", no_argument, 0, 'V'},
                                         {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "c:hV", opts, NULL)) != -1) {
        switch (o) {
        case 'c': path = optarg; break;
        case 'k': check = true; break;
        case 's': setup_only = true; break;
        case 'h': fputs(usage, stdout); return 0;
        case 'V': puts("conveyor-workers 0.1.0"); return 0;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "conveyor-workers: unexpected argument '%s'\n%s", argv[optind], usage);
        return 2;
    }
    log_init("supervisor");
    struct cfg cfg;
    char err[1024];
    if (cfg_load(path, &cfg, err, sizeof err) < 0) {
        fprintf(stderr, "conveyor-workers: %s\n", err);
        return 2;
    }
    if (check) {
        printf("%s: ok (%d queues)\n", path, cfg.nqueues);
        cfg_free(&cfg);
        return 0;
    }
    if (sodium_init() < 0) {
        fprintf(stderr, "conveyor-workers: libsodium failed to initialise\n");
        return 1;
    }
    signals_stop_sets(&stop_requested);

    struct db *db = db_connect_retry(cfg.database_url, &stop_requested);
    if (!db) { cfg_free(&cfg); return 0; }
    int applied = migrate_run(db, err, sizeof err);
    db_close(db);
    if (applied < 0) {
        log_error("%s", err);
        cfg_free(&cfg);
        return 3;
    }
    if (cfg_uses(&cfg, TRANSPORT_RABBITMQ)) {
        for (int attempt = 0; !stop_requested; attempt++) {
            struct broker *b = broker_open(&cfg, TRANSPORT_RABBITMQ, err, sizeof err);
            int rc = b ? broker_declare(b) : CV_ERETRY;
            if (b && rc < 0) snprintf(err, sizeof err, "%s", broker_error(b));
            broker_close(b);
            if (rc == 0) break;
            if (rc != CV_ERETRY) {
                log_error("cannot declare the RabbitMQ topology: %s", err);
                cfg_free(&cfg);
                return 2;
            }
            if (attempt == 0) log_warn("RabbitMQ unreachable, retrying: %s", err);
            backoff_sleep(backoff_ms(attempt, 100, 5000), &stop_requested);
        }
    }
    int rc = stop_requested || setup_only ? 0 : supervisor_run(&cfg);
    cfg_free(&cfg);
    return rc;
}
