/* migrate.c - applies sql/NNNN_*.sql in order, once, under an advisory lock. */
#include "core.h"

#include <stdio.h>
#include <string.h>

#define MIGRATION_LOCK "7305917400000001" /* pg_advisory_lock key for migrations */

int migrate_run(PGconn *db, char *err, size_t errlen) {
    PGresult *r = PQexec(db, "SELECT pg_advisory_lock(" MIGRATION_LOCK ")");
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "cannot take the migration lock: %s", PQerrorMessage(db));
        PQclear(r);
        return CV_ERETRY;
    }
    PQclear(r);
    int applied = 0, rc = 0;
    r = PQexec(db, "CREATE TABLE IF NOT EXISTS schema_migrations ("
                   " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())");
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        snprintf(err, errlen, "cannot create schema_migrations: %s", PQerrorMessage(db));
        rc = CV_EFATAL;
    }
    PQclear(r);
    for (const struct migration *m = migrations; rc == 0 && m->name; m++) {
        const char *p[1] = {m->name};
        if ((rc = db_exec(db, "SELECT 1 FROM schema_migrations WHERE version = $1", 1, p, &r, NULL)) < 0) {
            snprintf(err, errlen, "cannot read schema_migrations: %s", PQerrorMessage(db));
            break;
        }
        int done = PQntuples(r);
        PQclear(r);
        if (done) continue;
        /* one transaction per file: the file and its record land together */
        r = PQexec(db, "BEGIN");
        PQclear(r);
        r = PQexec(db, m->sql);
        if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) {
            snprintf(err, errlen, "migration %s failed: %s", m->name, PQerrorMessage(db));
            PQclear(r);
            PQclear(PQexec(db, "ROLLBACK"));
            rc = CV_EFATAL;
            break;
        }
        PQclear(r);
        if ((rc = db_exec(db, "INSERT INTO schema_migrations(version) VALUES ($1)", 1, p, NULL, NULL)) < 0 ||
            (rc = db_cmd(db, "COMMIT")) < 0) {
            snprintf(err, errlen, "cannot record migration %s: %s", m->name, PQerrorMessage(db));
            PQclear(PQexec(db, "ROLLBACK"));
            break;
        }
        log_info("applied migration %s", m->name);
        applied++;
    }
    PQclear(PQexec(db, "SELECT pg_advisory_unlock(" MIGRATION_LOCK ")"));
    return rc < 0 ? rc : applied;
}
