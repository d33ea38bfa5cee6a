/* migrate.c - applies a set of NNNN_*.sql in order, once, under an advisory
 * lock: sql/ into Conveyor's database, sql/producer/ into a producer's,
 * sql/subscriber/ into a subscriber's. */
#include "core.h"

#include <stdio.h>
#include <string.h>

#define MIGRATION_LOCK "7305917400000001" /* pg_advisory_lock key for migrations */
#define PRODUCER_LOCK "7305917400000002"  /* ... for a producer database's */
#define SUBSCRIBER_LOCK "7305917400000003" /* ... for a subscriber database's */

/* Which set, where its record lives, and what makes that record's table. */
struct migration_set {
    const struct migration *files;
    const char *lock;     /* the advisory lock key */
    const char *prepare;  /* creates the record table (and its schema) if missing */
    const char *seen;     /* $1: is this file applied? */
    const char *record;   /* $1: it is */
};

static const struct migration_set conveyor_set = {
    migrations, MIGRATION_LOCK,
    "CREATE TABLE IF NOT EXISTS schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    "SELECT 1 FROM schema_migrations WHERE version = $1", "INSERT INTO schema_migrations(version) VALUES ($1)"};

/* recorded as "producer/<file>": other sets may share schema conveyor and its record */
static const struct migration_set producer_set = {
    producer_migrations, PRODUCER_LOCK,
    "CREATE SCHEMA IF NOT EXISTS conveyor; CREATE TABLE IF NOT EXISTS conveyor.schema_migrations ("
    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    "SELECT 1 FROM conveyor.schema_migrations WHERE version = 'producer/' || $1",
    "INSERT INTO conveyor.schema_migrations(version) VALUES ('producer/' || $1)"};

/* recorded as "subscriber/<file>", beside a producer's when one database is both */
static const struct migration_set subscriber_set = {
    subscriber_migrations, SUBSCRIBER_LOCK,
    "CREATE SCHEMA IF NOT EXISTS conveyor; CREATE TABLE IF NOT EXISTS conveyor.schema_migrations ("
    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    "SELECT 1 FROM conveyor.schema_migrations WHERE version = 'subscriber/' || $1",
    "INSERT INTO conveyor.schema_migrations(version) VALUES ('subscriber/' || $1)"};

static int migrate_set(struct db *db, const struct migration_set *set, char *err, size_t errlen);

int migrate_run(struct db *db, char *err, size_t errlen) { return migrate_set(db, &conveyor_set, err, errlen); }

int migrate_producer(struct db *db, char *err, size_t errlen) { return migrate_set(db, &producer_set, err, errlen); }

int migrate_subscriber(struct db *db, char *err, size_t errlen) { return migrate_set(db, &subscriber_set, err, errlen); }

static int migrate_set(struct db *db, const struct migration_set *set, char *err, size_t errlen) {
    char lock[64];
    snprintf(lock, sizeof lock, "SELECT pg_advisory_lock(%s)", set->lock);
    int rc = db_cmd(db, lock);
    if (rc < 0) {
        snprintf(err, errlen, "cannot take the migration lock: %s", db_errstr(db));
        return rc;
    }
    int applied = 0;
    rc = db_cmd(db, set->prepare);
    if (rc < 0) snprintf(err, errlen, "cannot create the migrations' record: %s", db_errstr(db));
    for (const struct migration *m = set->files; rc == 0 && m->name; m++) {
        const char *p[1] = {m->name};
        PGresult *r;
        if ((rc = db_exec(db, set->seen, 1, p, &r)) < 0) {
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
        if ((rc = db_exec(db, set->record, 1, p, NULL)) < 0 ||
            (rc = db_cmd(db, "COMMIT")) < 0) {
            snprintf(err, errlen, "cannot record migration %s: %s", m->name, db_errstr(db));
            (void)db_cmd(db, "ROLLBACK");
            break;
        }
        log_info("applied migration %s", m->name);
        applied++;
    }
    snprintf(lock, sizeof lock, "SELECT pg_advisory_unlock(%s)", set->lock);
    (void)db_cmd(db, lock); /* and with the session, at the latest */
    return rc < 0 ? rc : applied;
}
