/* db.c - PostgreSQL access through libpq: parameterised statements only. */
#include "core.h"

#include <ctype.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void quiet_notice(void *arg, const char *msg) { (void)arg; (void)msg; }

/* A failed connection's message as one line: libpq's verbose text without its
 * LOCATION lines and SQLSTATEs (its SQLSTATE, the first one, goes to state),
 * and with no password of url in it. */
static void connect_message(const char *msg, const char *url, char state[6], char *err, size_t errlen) {
    char out[1024] = "", piece[512];
    state[0] = '\0';
    for (const char *p = msg; *p;) {
        size_t len = strcspn(p, "\n");
        const char *from = p;
        while (len && isspace((unsigned char)*from)) from++, len--;
        snprintf(piece, sizeof piece, "%.*s", (int)len, from);
        p = from + len + (from[len] != '\0');
        if (!piece[0] || strncmp(piece, "LOCATION:", 9) == 0) continue;
        /* "... FATAL:  28P01: password authentication failed ...": the code goes */
        char *sev = strstr(piece, ":  ");
        if (sev && strspn(sev + 3, "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") == 5 && strncmp(sev + 8, ": ", 2) == 0) {
            if (!state[0]) snprintf(state, 6, "%.5s", sev + 3);
            memmove(sev + 3, sev + 10, strlen(sev + 10) + 1);
        }
        size_t at = strlen(out);
        snprintf(out + at, sizeof out - at, "%s%s", at ? "; " : "", piece);
    }
    url_scrub(out, url, err, errlen);
}

/* True when a login failed because of what the URL says (see db_connect_class). */
static bool refused_login(PGconn *db, const char *state) {
    return PQconnectionNeedsPassword(db) || strncmp(state, "28", 2) == 0 || strcmp(state, "3D000") == 0;
}

PGconn *db_connect_class(const char *url, int *cls, char *err, size_t errlen) {
    if (cls) *cls = CV_ERETRY;
    char why[512];
    if (url_check(URL_POSTGRES, url, why, sizeof why) < 0) {
        snprintf(err, errlen, "%s", why);
        if (cls) *cls = CV_ECONFIG;
        return NULL;
    }
    /* application_name shows in pg_stat_activity which process holds a connection */
    char app[64];
    snprintf(app, sizeof app, "conveyor-%s-%d", log_component(), (int)getpid());
    const char *keys[] = {"dbname", "application_name", NULL};
    const char *vals[] = {url, app, NULL};
    /* started without blocking so that, before the server answers, the error
     * verbosity can be set: the SQLSTATE of a refused login is then in its message */
    PGconn *db = PQconnectStartParams(keys, vals, 1);
    if (!db) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    PQsetErrorVerbosity(db, PQERRORS_VERBOSE);
    /* the URL's connect_timeout, which only the blocking connect applies by itself */
    int64_t deadline = 0;
    PQconninfoOption *opts = PQconninfo(db);
    for (PQconninfoOption *o = opts; o && o->keyword; o++)
        if (strcmp(o->keyword, "connect_timeout") == 0 && o->val && atoi(o->val) > 0)
            deadline = clock_mono_ms() + 1000LL * (atoi(o->val) < 2 ? 2 : atoi(o->val)); /* libpq's minimum */
    PQconninfoFree(opts);
    PostgresPollingStatusType st = PQstatus(db) == CONNECTION_BAD ? PGRES_POLLING_FAILED : PGRES_POLLING_WRITING;
    bool timed_out = false;
    while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED) {
        struct pollfd p = {PQsocket(db), st == PGRES_POLLING_READING ? POLLIN : POLLOUT, 0};
        int wait = deadline ? (int)(deadline - clock_mono_ms()) : -1;
        int n = deadline && wait <= 0 ? 0 : poll(&p, 1, wait);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) break;
        if (n == 0) {
            timed_out = true;
            break;
        }
        st = PQconnectPoll(db);
    }
    if (PQstatus(db) != CONNECTION_OK || timed_out) {
        char state[6] = "";
        if (timed_out) snprintf(err, errlen, "timeout expired (connect_timeout)");
        else connect_message(PQerrorMessage(db), url, state, err, errlen);
        if (cls && refused_login(db, state)) *cls = CV_ECONFIG;
        PQfinish(db);
        return NULL;
    }
    PQsetErrorVerbosity(db, PQERRORS_DEFAULT);
    PQsetNoticeProcessor(db, quiet_notice, NULL); /* NOTICEs are not errors; keep stderr JSON-only */
    return db;
}

PGconn *db_connect(const char *url, char *err, size_t errlen) { return db_connect_class(url, NULL, err, errlen); }

PGconn *db_connect_wait(const char *url, volatile int *stop, char *err, size_t errlen) {
    char why[512];
    err[0] = '\0';
    for (int attempt = 0; !(stop && *stop); attempt++) {
        int cls;
        PGconn *db = db_connect_class(url, &cls, why, sizeof why);
        if (db) {
            if (attempt > 0) log_info("database is back");
            return db;
        }
        if (cls == CV_ECONFIG) {
            snprintf(err, errlen, "%s", why);
            return NULL;
        }
        if (attempt == 0) log_warn("database unreachable, retrying: %s", why);
        backoff_sleep(backoff_ms(attempt, 100, 5000), stop);
    }
    return NULL;
}

PGconn *db_connect_retry(const char *url, volatile int *stop) {
    char err[512], shown[512];
    PGconn *db = db_connect_wait(url, stop, err, sizeof err);
    if (!db && err[0]) {
        url_redact(url, shown, sizeof shown);
        log_error("database (%s): %s; stopping (a configuration error is not retried)", shown, err);
    }
    return db;
}

/* The class of a failed statement, from its SQLSTATE and the connection. */
static int classify(PGconn *db, const char *state) {
    if (PQstatus(db) != CONNECTION_OK) return CV_ERETRY;
    if (!state) return CV_ERETRY; /* no SQLSTATE: the connection broke mid-statement */
    if (strcmp(state, "40001") == 0 || strcmp(state, "40P01") == 0 || /* serialization, deadlock */
        strcmp(state, "57014") == 0 || strcmp(state, "55P03") == 0 || /* timeout, lock not available */
        strncmp(state, "08", 2) == 0 || strcmp(state, "57P01") == 0 || /* connection, admin shutdown */
        strcmp(state, "57P02") == 0 || strcmp(state, "57P03") == 0 || strcmp(state, "53300") == 0)
        return CV_ERETRY;
    return CV_EFATAL;
}

static char last_error[512];

const char *db_last_error(void) { return last_error; }

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
    /* in a pipeline the connection's message may be a later statement's */
    const char *msg = r && *PQresultErrorMessage(r) ? PQresultErrorMessage(r) : PQerrorMessage(db);
    snprintf(last_error, sizeof last_error, "%s", msg);
    for (size_t n = strlen(last_error); n && (last_error[n - 1] == '\n' || last_error[n - 1] == ' ');)
        last_error[--n] = '\0';
    if (sqlstate && state) snprintf(sqlstate, 6, "%s", state);
    int cls = classify(db, state);
    if (cls == CV_EFATAL || !sqlstate) {
        char line[160];
        snprintf(line, sizeof line, "%s", sql);
        for (char *p = line; *p; p++) if (*p == '\n') *p = ' ';
        if (!(sqlstate && state && strcmp(state, "23505") == 0))
            log_msg(cls == CV_EFATAL ? LOG_ERROR : LOG_WARN, NULL, "SQL failed (%s): %s [%s]",
                    state ? state : "no state", last_error, line);
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
    st->sql = strdup(sql);
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
        return CV_EFATAL;
    }
    const char *name = NULL;
    int rc = nparams > 0 ? prepare_once(db, sql, nparams, &name, NULL) : 0; /* SAVEPOINT, BEGIN: unprepared */
    if (rc < 0) return rc;
    struct deferred *d = &deferred[ndeferred++];
    deferred_db = db;
    d->sql = strdup(sql);
    d->name = name;
    d->nparams = nparams;
    d->keep = out;
    d->params = nparams > 0 ? malloc((size_t)nparams * sizeof *d->params) : NULL;
    for (int j = 0; j < nparams; j++) d->params[j] = params[j] ? strdup(params[j]) : NULL;
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
    char *keep_sql = strdup(failed_sql);
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
    free(keep_sql);
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
