/* admin_producer.c - conveyor-admin producer install|status|retry: the
 * producer's outbox (sql/producer/) in a producer's own database, installed,
 * looked at, and its failed rows sent again. The database is --database URL,
 * or the producer NAME of queues.conf's `producers`.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The producer database the words and --database name: URL, or NAME's url. */
static const char *producer_url(const struct cfg *cfg, const char *database, const char *name, char *label,
                                size_t n) {
    if (database) {
        url_redact(database, label, n);
        return database;
    }
    for (int i = 0; name && i < cfg->nproducers; i++)
        if (strcmp(cfg->producers[i].name, name) == 0) {
            snprintf(label, n, "producer %s", name);
            return cfg->producers[i].url;
        }
    if (!name && cfg->nproducers == 1) {
        snprintf(label, n, "producer %s", cfg->producers[0].name);
        return cfg->producers[0].url;
    }
    return NULL;
}

/* Installs or upgrades schema conveyor, then writes the types cfg routes. */
static int producer_install(const struct cfg *cfg, struct db *db, const char *label) {
    char err[1024];
    int applied = migrate_producer(db, err, sizeof err);
    if (applied < 0) {
        fprintf(stderr, "conveyor-admin: %s: %s\n", label, err);
        return exit_of_class(applied);
    }
    if (producer_types_sync(db, cfg, true) < 0) {
        fprintf(stderr, "conveyor-admin: %s: cannot write the command types: %s\n", label, db_errstr(db));
        return EXIT_UNREACHABLE;
    }
    int types = 0;
    for (int i = 0; i < cfg->nqueues; i++) types += cfg->queues[i].ncommands;
    printf("%s: schema conveyor %s (%d migration%s applied), %d command types of %s\n", label,
           applied ? "installed" : "up to date", applied, applied == 1 ? "" : "s", types, cfg->path);
    return 0;
}

/* Prints the counts and the failed rows (at most 100). */
static int producer_status(struct db *db, const char *label, bool json) {
    PGresult *r, *f;
    if (db_exec(db, "SELECT (SELECT count(*) FROM conveyor.outbound WHERE state = 'pending'), "
                    "(SELECT count(*) FROM conveyor.outbound WHERE state = 'failed'), "
                    "(SELECT count(*) FROM conveyor.outbound WHERE state = 'forwarded'), "
                    "coalesce((SELECT round(extract(epoch FROM now() - min(created_at))::numeric, 3) "
                    "FROM conveyor.outbound WHERE state = 'pending'), 0)", 0, NULL, &r) < 0) {
        fprintf(stderr, "conveyor-admin: %s: %s (is schema conveyor installed? conveyor-admin producer install)\n",
                label, db_errstr(db));
        return exit_of_class(db_err(db));
    }
    if (db_exec(db, "SELECT command_id::text, type, error, created_at::text FROM conveyor.outbound "
                    "WHERE state = 'failed' ORDER BY id LIMIT 100", 0, NULL, &f) < 0) {
        PQclear(r);
        fprintf(stderr, "conveyor-admin: %s: %s\n", label, db_errstr(db));
        return EXIT_UNREACHABLE;
    }
    if (json) {
        printf("{\"kind\":\"outbound\",\"pending\":%s,\"failed\":%s,\"forwarded\":%s,\"oldest_age_seconds\":%s}\n",
               PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1), PQgetvalue(r, 0, 2), PQgetvalue(r, 0, 3));
        for (int i = 0; i < PQntuples(f); i++) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "kind", "failed");
            cJSON_AddStringToObject(o, "commandId", PQgetvalue(f, i, 0));
            cJSON_AddStringToObject(o, "type", PQgetvalue(f, i, 1));
            cJSON_AddStringToObject(o, "error", PQgetvalue(f, i, 2));
            cJSON_AddStringToObject(o, "createdAt", PQgetvalue(f, i, 3));
            char *line = cJSON_PrintUnformatted(o);
            if (line) puts(line);
            free(line);
            cJSON_Delete(o);
        }
    } else {
        printf("%s: %s pending (oldest %s s), %s failed, %s forwarded (kept for relay.retention_seconds)\n", label,
               PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 3), PQgetvalue(r, 0, 1), PQgetvalue(r, 0, 2));
        for (int i = 0; i < PQntuples(f); i++)
            printf("failed %s %s (%s): %s\n", PQgetvalue(f, i, 0), PQgetvalue(f, i, 1), PQgetvalue(f, i, 3),
                   PQgetvalue(f, i, 2));
    }
    PQclear(r);
    PQclear(f);
    return 0;
}

/* Sends failed rows again (one command id, or all): each is written again as
 * a new pending row (a new id, so that the forwarder's claim floor, which has
 * passed the old one, finds it; the same command id), in one transaction. */
static int producer_retry(struct db *db, const char *label, const char *which) {
    bool all = strcmp(which, "--all") == 0;
    char id[ID_LEN + 1];
    if (!all && !id_parse(which, id)) {
        fprintf(stderr, "conveyor-admin: '%s' is not a command id (or --all)\n", which);
        return EXIT_USAGE;
    }
    const char *p[1] = {all ? NULL : id};
    PGresult *r;
    if (db_exec(db, "WITH gone AS (DELETE FROM conveyor.outbound WHERE state = 'failed' "
                    "AND ($1::uuid IS NULL OR command_id = $1::uuid) "
                    "RETURNING command_id, type, payload, correlation_id, not_before, created_at, id), "
                    "again AS (INSERT INTO conveyor.outbound (command_id, type, payload, correlation_id, not_before, "
                    "created_at) SELECT command_id, type, payload, correlation_id, not_before, created_at FROM gone "
                    "ORDER BY id RETURNING 1), woken AS (SELECT pg_notify('conveyor_outbound', '')) "
                    "SELECT count(*) FROM again, woken", 1, p, &r) < 0) {
        fprintf(stderr, "conveyor-admin: %s: %s\n", label, db_errstr(db));
        return EXIT_UNREACHABLE;
    }
    long n = strtol(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
    printf("%s: %ld failed row%s pending again\n", label, n, n == 1 ? "" : "s");
    return n > 0 ? 0 : EXIT_NONE;
}

int admin_producer(const struct cfg *cfg, char **words, int n, const char *database, bool json) {
    const char *verb = n >= 2 ? words[1] : "";
    bool retry = strcmp(verb, "retry") == 0;
    int args = n - 2 - retry; /* words after the verb (and retry's ID), a NAME at most */
    if ((strcmp(verb, "install") != 0 && strcmp(verb, "status") != 0 && !retry) || args < 0 || args > 1 ||
        (database && args == 1)) {
        fprintf(stderr, "usage: conveyor-admin producer install|status [NAME | --database URL]\n"
                        "       conveyor-admin producer retry ID|--all [NAME | --database URL]\n");
        return EXIT_USAGE;
    }
    char label[512];
    const char *url = producer_url(cfg, database, args == 1 ? words[n - 1] : NULL, label, sizeof label);
    if (!url) {
        fprintf(stderr, "conveyor-admin: producer %s: give --database URL, or the NAME of a producer of %s\n",
                args == 1 ? words[n - 1] : "", cfg->path);
        return EXIT_USAGE;
    }
    char err[512];
    int cls = CV_ERETRY;
    struct db *db = db_connect_class(url, &cls, err, sizeof err);
    if (!db) {
        fprintf(stderr, "conveyor-admin: %s: %s\n", label, err);
        return exit_of_class(cls);
    }
    int rc = strcmp(verb, "install") == 0 ? producer_install(cfg, db, label)
           : retry                        ? producer_retry(db, label, words[2])
                                          : producer_status(db, label, json);
    db_close(db);
    return rc;
}
