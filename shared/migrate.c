/* migrate.c - applies sql/NNNN_*.sql in order, once, under an advisory lock. */
#include "core.h"

#include <stdio.h>
#include <string.h>

#define MIGRATION_LOCK "7305917400000001" /* pg_advisory_lock key for migrations */

int migrate_run(struct db *db, char *err, size_t errlen) {
    int rc = db_cmd(db, "SELECT pg_advisory_lock(" MIGRATION_LOCK ")");
    if (rc < 0) {
        snprintf(err, errlen, "cannot take the migration lock: %s", db_errstr(db));
        return rc;
    }
    int applied = 0;
    rc = db_cmd(db, "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())");
    if (rc < 0) snprintf(err, errlen, "cannot create schema_migrations: %s", db_errstr(db));
    for (const struct migration *m = migrations; rc == 0 && m->name; m++) {
        const char *p[1] = {m->name};
        PGresult *r;
        if ((rc = db_exec(db, "SELECT 1 FROM schema_migrations WHERE version = $1", 1, p, &r)) < 0) {
            snprintf(err, errlen, "cannot read schema_migrations: %s", db_errstr(db));
            break;
        }
        int done = PQntuples(r);
        PQclear(r);
        if (done) continue;
        /* one transaction per file: the file and its record land together */
        if ((rc = db_cmd(db, "BEGIN")) < 0 || (rc = db_cmd(db, m->sql)) < 0) {
            snprintf(err, errlen, "migration %s failed: %s", m->name, db_errstr(db));
            (void)db_cmd(db, "ROLLBACK"); /* fails only when the connection is gone, which rolls back too */
            break;
        }
        if ((rc = db_exec(db, "INSERT INTO schema_migrations(version) VALUES ($1)", 1, p, NULL)) < 0 ||
            (rc = db_cmd(db, "COMMIT")) < 0) {
            snprintf(err, errlen, "cannot record migration %s: %s", m->name, db_errstr(db));
            (void)db_cmd(db, "ROLLBACK");
            break;
        }
        log_info("applied migration %s", m->name);
        applied++;
    }
    (void)db_cmd(db, "SELECT pg_advisory_unlock(" MIGRATION_LOCK ")"); /* and with the session, at the latest */
    return rc < 0 ? rc : applied;
}
