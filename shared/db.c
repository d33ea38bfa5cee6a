/* db.c - PostgreSQL access through libpq: parameterised statements only. */
#include "core.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void quiet_notice(void *arg, const char *msg) { (void)arg; (void)msg; }

PGconn *db_connect(const char *url, char *err, size_t errlen) {
    /* application_name shows in pg_stat_activity which process holds a connection */
    char app[64];
    snprintf(app, sizeof app, "conveyor-%s-%d", log_component(), (int)getpid());
    const char *keys[] = {"dbname", "application_name", NULL};
    const char *vals[] = {url, app, NULL};
    PGconn *db = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(db) != CONNECTION_OK) {
        snprintf(err, errlen, "%s", PQerrorMessage(db));
        size_t n = strlen(err);
        while (n && (err[n - 1] == '\n' || err[n - 1] == ' ')) err[--n] = '\0';
        PQfinish(db);
        return NULL;
    }
    PQsetNoticeProcessor(db, quiet_notice, NULL); /* NOTICEs are not errors; keep stderr JSON-only */
    return db;
}

PGconn *db_connect_retry(const char *url, volatile sig_atomic_t *stop) {
    char err[512];
    for (int attempt = 0; !(stop && *stop); attempt++) {
        PGconn *db = db_connect(url, err, sizeof err);
        if (db) {
            if (attempt > 0) log_info("database is back");
            return db;
        }
        if (attempt == 0) log_warn("database unreachable, retrying: %s", err);
        backoff_sleep(backoff_ms(attempt, 100, 5000), stop);
    }
    return NULL;
}

/* The class of a failed statement, from its SQLSTATE and the connection:
 * CV_ERETRY for what passes (no connection, or SQLSTATE class 08 connection,
 * 40001 serialization failure, 40P01 deadlock, 40003 completion unknown, 53
 * out of resources, 55P03 lock timeout, 55006 object in use, 57 operator
 * intervention (statement timeout, shutdown), 58 system error, 25006 a read-only
 * server: a standby after a failover); CV_EREFUSED for every other error, which
 * the same statement would meet again (a constraint violation, bad data, a
 * missing object, a bug). */
static int classify(PGconn *db, const char *state) {
    if (PQstatus(db) != CONNECTION_OK) return CV_ERETRY;
    if (!state) return CV_ERETRY; /* no SQLSTATE: the connection broke mid-statement */
    static const char *const transient[] = {"08", "40001", "40P01", "40003", "53", "55P03", "55006",
                                            "57", "58", "25006"};
    for (size_t i = 0; i < sizeof transient / sizeof transient[0]; i++)
        if (strncmp(state, transient[i], strlen(transient[i])) == 0) return CV_ERETRY;
    return CV_EREFUSED;
}

static char last_error[512];

const char *db_last_error(void) { return last_error; }

/* Writes what went wrong in r into out, safe to log and to store: the primary
 * message, the SQLSTATE and the constraint, table and column when the server
 * names them. Never DETAIL, HINT or CONTEXT: they may carry row contents (a
 * failing row holds a password hash, a duplicate key an email). Without a
 * result (the connection broke) the connection's message. */
static void error_text(PGconn *db, const PGresult *r, char *out, size_t n) {
    const char *primary = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (!primary) {
        snprintf(out, n, "%s", PQerrorMessage(db)); /* libpq's own text: no row data */
        for (size_t len = strlen(out); len && (out[len - 1] == '\n' || out[len - 1] == ' ');) out[--len] = '\0';
        if (!*out) snprintf(out, n, "the connection to the database broke");
        return;
    }
    static const struct { int field; const char *name; } named[] = {
        {PG_DIAG_SQLSTATE, "SQLSTATE"}, {PG_DIAG_CONSTRAINT_NAME, "constraint"},
        {PG_DIAG_TABLE_NAME, "table"}, {PG_DIAG_COLUMN_NAME, "column"}};
    size_t len = (size_t)snprintf(out, n, "%s", primary);
    for (size_t i = 0; i < sizeof named / sizeof named[0] && len < n; i++) {
        const char *v = PQresultErrorField(r, named[i].field);
        if (v) len += (size_t)snprintf(out + len, n - len, "%s%s %s", i ? ", " : " (", named[i].name, v);
    }
    if (len < n) snprintf(out + len, n - len, ")");
}

/* Hands a result to the caller or classes its error (see db_exec). */
static int db_result(PGconn *db, PGresult *r, const char *sql, PGresult **out, char sqlstate[6]) {
    if (out) *out = NULL;
    if (sqlstate) sqlstate[0] = '\0';
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
        if (out) *out = r;
        else PQclear(r);
        return 0;
    }
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    error_text(db, r, last_error, sizeof last_error);
    if (sqlstate && state) snprintf(sqlstate, 6, "%s", state);
    int cls = classify(db, state);
    if (cls == CV_EREFUSED || !sqlstate) {
        char line[160];
        snprintf(line, sizeof line, "%s", sql);
        for (char *p = line; *p; p++) if (*p == '\n') *p = ' ';
        if (!(sqlstate && state && strcmp(state, "23505") == 0))
            log_msg(cls == CV_EREFUSED ? LOG_ERROR : LOG_WARN, NULL, "SQL failed: %s [%s]", last_error, line);
    }
    PQclear(r);
    return cls;
}

/* Prepared statements: each distinct SQL text db_exec runs on a connection is
 * prepared there once (PQprepare), then only executed, so the server parses
 * and plans it once per connection. Entries of a connection go with db_close. */
#define STMT_MAX 128
static struct stmt {
    PGconn *db;
    uint32_t hash;
    char *sql;
    char name[16];
} stmts[STMT_MAX];
static int nstmts;
static unsigned stmt_seq;

static uint32_t hash_sql(const char *s) {
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

static int pipeline_run(PGconn *db, const char *sql, const char *name, int nparams, const char *const *params,
                        PGresult **out, char sqlstate[6]);
static int db_pending(PGconn *db);

/* Runs db's deferred statements, if any (one round trip). Returns 0 or the first error class. */
static int flush(PGconn *db, char sqlstate[6]) {
    return db_pending(db) ? pipeline_run(db, NULL, NULL, 0, NULL, NULL, sqlstate) : 0;
}

/* Sets *name to the statement prepared for sql on db, preparing it if new
 * (NULL when the table is full: then it runs unprepared). A new one is
 * prepared after db's deferred statements have run, since they may be what
 * makes the transaction usable again (ROLLBACK TO SAVEPOINT). Returns 0, or
 * the error class of those statements or of the PREPARE, which is then the
 * statement's error. */
static int prepare_once(PGconn *db, const char *sql, int nparams, const char **name, char sqlstate[6]) {
    *name = NULL;
    uint32_t h = hash_sql(sql);
    for (int i = 0; i < nstmts; i++)
        if (stmts[i].db == db && stmts[i].hash == h && strcmp(stmts[i].sql, sql) == 0) {
            *name = stmts[i].name;
            return 0;
        }
    if (nstmts == STMT_MAX) return 0;
    int rc = flush(db, sqlstate);
    if (rc < 0) return rc;
    struct stmt *st = &stmts[nstmts];
    snprintf(st->name, sizeof st->name, "cv%u", ++stmt_seq);
    PGresult *r = PQprepare(db, st->name, sql, nparams, NULL);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) return db_result(db, r, sql, NULL, sqlstate);
    PQclear(r);
    st->db = db;
    st->hash = h;
    if (!(st->sql = strdup(sql))) return 0; /* no memory to remember it: it runs unprepared */
    nstmts++;
    *name = st->name;
    return 0;
}

void db_close(PGconn *db) {
    if (!db) return;
    db_discard(db);
    for (int i = 0; i < nstmts;) {
        if (stmts[i].db == db) {
            free(stmts[i].sql);
            stmts[i] = stmts[--nstmts];
        } else {
            i++;
        }
    }
    PQfinish(db);
}

/* Deferred statements of one connection (a worker has one): sent ahead of
 * the next statement, in one pipeline. */
#define DEFER_MAX 160 /* worker.c's AHEAD_MAX commands, two statements each, and a few more */
static struct deferred {
    char *sql;       /* the text, for error messages and unprepared sends */
    const char *name; /* prepared statement, or NULL */
    int nparams;
    char **params;   /* copies, owned */
    PGresult **keep; /* where its result goes, or NULL: cleared */
} deferred[DEFER_MAX];
static PGconn *deferred_db;
static int ndeferred;

/* The number of statements deferred on db and not yet sent. */
static int db_pending(PGconn *db) { return db == deferred_db ? ndeferred : 0; }

void db_discard(PGconn *db) {
    if (db != deferred_db) return;
    for (int i = 0; i < ndeferred; i++) {
        for (int j = 0; j < deferred[i].nparams; j++) free(deferred[i].params[j]);
        free(deferred[i].params);
        free(deferred[i].sql);
    }
    ndeferred = 0;
    deferred_db = NULL;
}

int db_defer(PGconn *db, const char *sql, int nparams, const char *const *params) {
    return db_defer_result(db, sql, nparams, params, NULL);
}

int db_flush(PGconn *db) { return flush(db, NULL); }

int db_defer_result(PGconn *db, const char *sql, int nparams, const char *const *params, PGresult **out) {
    if (out) *out = NULL;
    if ((deferred_db && deferred_db != db) || ndeferred == DEFER_MAX) {
        snprintf(last_error, sizeof last_error, "too many deferred statements (at most %d, one connection)",
                 DEFER_MAX);
        log_error("%s", last_error);
        return CV_EREFUSED;
    }
    const char *name = NULL;
    int rc = nparams > 0 ? prepare_once(db, sql, nparams, &name, NULL) : 0; /* SAVEPOINT, BEGIN: unprepared */
    if (rc < 0) return rc;
    struct deferred *d = &deferred[ndeferred++];
    deferred_db = db;
    d->sql = strdup(sql);
    d->name = name;
    d->keep = out;
    d->params = nparams > 0 ? calloc((size_t)nparams, sizeof *d->params) : NULL;
    d->nparams = d->params ? nparams : 0;
    bool copied = d->sql && d->nparams == nparams;
    for (int j = 0; copied && j < nparams; j++)
        if (params[j] && !(d->params[j] = strdup(params[j]))) copied = false;
    if (!copied) {
        db_discard(db); /* frees what was copied; nothing stays deferred */
        snprintf(last_error, sizeof last_error, "out of memory deferring a statement");
        log_error("%s", last_error);
        return CV_ERETRY;
    }
    return 0;
}

/* Sends one statement into the open pipeline. Returns 1 when sent. */
static int pipeline_send(PGconn *db, const char *sql, const char *name, int nparams, const char *const *params) {
    return name ? PQsendQueryPrepared(db, name, nparams, params, NULL, NULL, 0)
                : PQsendQueryParams(db, sql, nparams, NULL, params, NULL, NULL, 0);
}

/* Sends the deferred statements and then sql (one statement; NULL: none) in
 * one pipeline, and reads every result. Returns as db_exec, with the first
 * error among them (the statements after a failed one do not run). Nothing
 * stays deferred. */
static int pipeline_run(PGconn *db, const char *sql, const char *name, int nparams, const char *const *params,
                        PGresult **out, char sqlstate[6]) {
    PGresult *failed = NULL, *mine = NULL;
    int n = ndeferred, total = n + (sql != NULL);
    const char *failed_sql = sql ? sql : n ? deferred[n - 1].sql : "";
    bool ok = PQenterPipelineMode(db) == 1;
    for (int i = 0; ok && i < n; i++)
        ok = pipeline_send(db, deferred[i].sql, deferred[i].name, deferred[i].nparams,
                           (const char *const *)deferred[i].params) == 1;
    if (sql) ok = ok && pipeline_send(db, sql, name, nparams, params) == 1;
    ok = ok && PQpipelineSync(db) == 1;
    /* one result per statement, each followed by NULL, then the sync */
    int i = 0, nulls = 0;
    while (ok) {
        PGresult *r = PQgetResult(db);
        if (!r) {
            if (++nulls > 1 || PQstatus(db) != CONNECTION_OK) ok = false; /* nothing more will come */
            continue;
        }
        nulls = 0;
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_PIPELINE_SYNC) {
            PQclear(r);
            break;
        }
        if (i == n && sql && !failed) {
            mine = r;
        } else if (!failed && st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
            failed = r; /* the ones after it come back PGRES_PIPELINE_ABORTED */
            failed_sql = i < n ? deferred[i].sql : sql;
        } else if (i < n && deferred[i].keep && !failed) {
            *deferred[i].keep = r;
        } else {
            PQclear(r);
        }
        i++;
    }
    if (i != total) ok = false;
    if (PQpipelineStatus(db) != PQ_PIPELINE_OFF && PQexitPipelineMode(db) != 1) ok = false;
    char keep_sql[160]; /* db_result shows this much of it */
    snprintf(keep_sql, sizeof keep_sql, "%s", failed_sql);
    db_discard(db);
    int rc;
    if (failed) {
        PQclear(mine);
        rc = db_result(db, failed, keep_sql, out, sqlstate);
    } else if (!ok) {
        PQclear(mine);
        rc = db_result(db, NULL, keep_sql, out, sqlstate); /* the connection broke */
    } else {
        rc = sql ? db_result(db, mine, keep_sql, out, sqlstate) : 0;
    }
    return rc;
}

int db_exec(PGconn *db, const char *sql, int nparams, const char *const *params, PGresult **out,
            char sqlstate[6]) {
    const char *name;
    if (out) *out = NULL;
    int rc = prepare_once(db, sql, nparams, &name, sqlstate);
    if (rc < 0) {
        db_discard(db);
        return rc;
    }
    if (db_pending(db)) return pipeline_run(db, sql, name, nparams, params, out, sqlstate);
    PGresult *r = name ? PQexecPrepared(db, name, nparams, params, NULL, NULL, 0)
             : PQexecParams(db, sql, nparams, NULL, params, NULL, NULL, 0);
    return db_result(db, r, sql, out, sqlstate);
}

int db_cmd(PGconn *db, const char *sql) {
    if (db_pending(db)) return pipeline_run(db, sql, NULL, 0, NULL, NULL, NULL);
    return db_result(db, PQexec(db, sql), sql, NULL, NULL);
}

char *db_array(const char *const *items, int n) {
    size_t len = 3;
    for (int i = 0; i < n; i++)
        if (items[i]) len += 2 * strlen(items[i]) + 3; /* quotes, a comma, every character escaped at most */
    char *out = xmalloc(len), *p = out;
    *p++ = '{';
    for (int i = 0; i < n; i++) {
        if (!items[i]) continue;
        if (p > out + 1) *p++ = ',';
        *p++ = '"';
        for (const char *c = items[i]; *c; c++) {
            if (*c == '"' || *c == '\\') *p++ = '\\';
            *p++ = *c;
        }
        *p++ = '"';
    }
    *p++ = '}';
    *p = '\0';
    return out;
}
