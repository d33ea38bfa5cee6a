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
    "      --check        check the configuration and the syntax of its URLs (no\n"
    "                     connection), print them with passwords masked, and exit\n"
    "      --setup        apply the migrations, declare the RabbitMQ topology, and exit\n"
    "  -h, --help         this help\n"
    "  -V, --version      print the version\n"
    "\n"
    "Environment: CONVEYOR_DATABASE_URL, CONVEYOR_RABBITMQ_URL, CONVEYOR_REDIS_URL (or\n"
    "CONVEYOR_DATABASE_URL_FILE, ..._FILE: a file holding the URL, e.g. a container\n"
    "secret; not both), CONVEYOR_TRANSPORT (rabbitmq|redis), CONVEYOR_EVENTS_TRANSPORT,\n"
    "CONVEYOR_LOG_LEVEL.\n"
    "\n"
    "At start it connects to the database, then to RabbitMQ and Redis if the queues or\n"
    "the events use them. A server that cannot be reached is waited for (logged once\n"
    "when the wait starts and once when it is back); a misconfiguration is not: an\n"
    "unparsable URL, an unknown scheme, credentials (or a database, vhost, Redis\n"
    "database) the server refuses, or a TLS certificate refused either way (the\n"
    "server's not trusted or not for the host; a client certificate the server\n"
    "refuses, or none where it wants one) stop it at once with exit status 2 and\n"
    "one line naming the setting, the URL with its password masked, and the reason.\n"
    "SIGTERM or SIGINT drains the pool and exits 0; SIGHUP reloads FILE and replaces\n"
    "the workers one by one.\n"
    "\n"
    "Exit status: 0 stopped cleanly, 2 usage or configuration error (including\n"
    "credentials or a TLS certificate a server refused, a server certificate that is\n"
    "not trusted or not for the host), 3 the database schema could not be migrated,\n"
    "1 libsodium failed to initialise (the machine, not the configuration).\n";

/* Says on stderr, in one line, that the URL of setting is wrong, and why. */
static void url_refused(const char *setting, const char *url, const char *why) {
    char shown[512], reason[1024];
    url_redact(url, shown, sizeof shown);
    url_scrub(why, url, reason, sizeof reason);
    fprintf(stderr, "conveyor-workers: %s (%s): %s\n", setting, shown, reason);
}

/* Waits until transport t's broker answers (and, for RabbitMQ, takes the
 * topology), logging once when the wait starts and once when it is over.
 * Returns 0, 1 when stopped first, or the exit status after saying why on
 * stderr (a configuration error, a topology RabbitMQ refuses). */
static int broker_wait(const struct cfg *cfg, enum transport t) {
    const char *name = t == TRANSPORT_REDIS ? "Redis" : "RabbitMQ";
    const char *setting = t == TRANSPORT_REDIS ? cfg->redis_url_setting : cfg->rabbitmq_url_setting;
    const char *url = t == TRANSPORT_REDIS ? cfg->redis_url : cfg->rabbitmq_url;
    char err[1024];
    while (!stop_requested) {
        struct broker *b = broker_open_wait(cfg, t, &stop_requested, err, sizeof err);
        if (!b && err[0]) {
            url_refused(setting, url, err);
            return CV_EXIT_CONFIG;
        }
        broker_close(b);
        if (!b) break;
        int rc = t == TRANSPORT_RABBITMQ ? broker_declare_topology(cfg, err, sizeof err) : 0;
        if (rc == 0 && t == TRANSPORT_RABBITMQ && (rc = queue_limits_apply(cfg, err, sizeof err)) < 0) {
            if (rc != CV_ERETRY) {
                fprintf(stderr, "conveyor-workers: cannot bound the RabbitMQ queues: %s\n", err);
                return CV_EXIT_CONFIG;
            }
            log_warn("cannot set the bounded queues' policies (%s); trying again", err);
            backoff_sleep(1000, &stop_requested);
            continue;
        }
        if (rc == 0) return 0;
        if (rc == CV_ECONFIG) {
            url_refused(setting, url, err);
            return CV_EXIT_CONFIG;
        }
        if (rc != CV_ERETRY) {
            log_error("cannot declare the RabbitMQ topology: %s", err);
            return 2;
        }
        log_warn("%s went away while its topology was declared (%s); waiting for it", name, err);
        backoff_sleep(1000, &stop_requested);
    }
    return 1;
}

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
    pool_order_fields(&cfg);
    if (check) {
        char db[512], amqp[512], redis[512];
        url_redact(cfg.database_url, db, sizeof db);
        url_redact(cfg.rabbitmq_url, amqp, sizeof amqp);
        url_redact(cfg.redis_url, redis, sizeof redis);
        printf("%s: ok (%d queues, %d schedules, %d rate limits)\n%s %s\n", path, cfg.nqueues, cfg.nschedules,
               cfg.nrate_limits, cfg.database_url_setting, db);
        if (cfg_uses(&cfg, TRANSPORT_RABBITMQ)) printf("%s %s\n", cfg.rabbitmq_url_setting, amqp);
        if (cfg_uses(&cfg, TRANSPORT_REDIS)) printf("%s %s\n", cfg.redis_url_setting, redis);
        cfg_free(&cfg);
        return 0;
    }
    if (sodium_init() < 0) {
        fprintf(stderr, "conveyor-workers: libsodium failed to initialise\n");
        return 1;
    }
    signals_stop_sets(&stop_requested);

    struct db *db = db_connect_wait(cfg.database_url, &stop_requested, err, sizeof err);
    if (!db) {
        if (err[0]) url_refused(cfg.database_url_setting, cfg.database_url, err);
        cfg_free(&cfg);
        return err[0] ? CV_EXIT_CONFIG : 0;
    }
    int applied = migrate_run(db, err, sizeof err);
    db_close(db);
    if (applied < 0) {
        log_error("%s", err);
        cfg_free(&cfg);
        return 3;
    }
    for (enum transport t = TRANSPORT_RABBITMQ; t <= TRANSPORT_REDIS; t++) {
        int status = cfg_uses(&cfg, t) ? broker_wait(&cfg, t) : 0;
        if (status > 1) {
            cfg_free(&cfg);
            return status;
        }
    }
    /* before the fork: every process of the pool sees the paused queues through it */
    if (!setup_only && !queue_pause_init())
        log_warn("no shared page for paused queues; each worker reads them for itself");
    /* ... and the database breaker's state (breaker.c) */
    if (!setup_only && !breaker_init())
        log_warn("no shared page for the database breaker; each worker keeps its own");
    int rc = stop_requested || setup_only ? 0 : supervisor_run(&cfg);
    cfg_free(&cfg);
    return rc;
}
