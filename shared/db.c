/* db.c - a PostgreSQL connection as a context, in the manner of hiredis'
 * redisContext: struct db carries the libpq connection, the statements
 * prepared on it, the statements deferred to its next round trip with the
 * results kept for their handles, and the last error (err: its class, errstr:
 * its text, safe to log and to store). Parameterised statements only. One
 * context per process and connection; nothing here is global. */
#include "core.h"

#include <ctype.h>
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void quiet_notice(void *arg, const char *msg) { (void)arg; (void)msg; }

/* A prepared statement: each distinct SQL text run with parameters on a
 * connection is prepared there once (PQprepare), then only executed, so the
 * server parses and plans it once per connection. */
struct db_stmt {
    uint32_t hash;
    char *sql;
    char name[16];
};

/* A statement deferred to the next round trip (db_defer). */
struct db_deferred {
    char *sql;        /* the text, for error messages and unprepared sends */
    const char *name; /* prepared statement, or NULL */
    int nparams;
    char **params;    /* copies, owned */
    int handle;       /* where its result goes (db_defer_result), or -1: cleared */
};

/* A result kept for its handle until db_take_result or db_release_results. */
struct db_slot {
    bool used;
    bool ran;       /* its statement has been sent and its result read */
    PGresult *r;    /* NULL until it ran, and when it failed */
};

struct db {
    PGconn *conn;
    int err;
    char errstr[512];
    char sqlstate[6];
    struct db_stmt *stmts;
    int nstmts, capstmts;
    unsigned stmt_seq;
    struct db_deferred *deferred;
    int ndeferred, capdeferred;
    struct db_slot *slots;
    int nslots;
};

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

/* True when msg (libpq's) is the server refusing the client certificate of
 * sslcert / sslkey during the TLS handshake: an alert from the server, "SSL
 * error: tlsv1 alert unknown ca" (not signed by a CA it trusts), "sslv3 alert
 * bad certificate", "... certificate unknown / expired / revoked / required". */
static bool client_cert_refused(const char *msg) {
    return strstr(msg, "alert unknown ca") || strstr(msg, "alert bad certificate") ||
           strstr(msg, "alert certificate") || strstr(msg, "alert unsupported certificate") ||
           strstr(msg, "alert access denied");
}

/* True when a connection failed because of what the URL says (see
 * db_connect_class): a refused login, a server certificate that TLS
 * verification refused (libpq gives no code for it: its message names the
 * certificate, as "server certificate for ... does not match host name" and
 * "certificate verify failed" do), a client certificate the server refused
 * (client_cert_refused), or a client certificate or key libpq cannot use
 * ("could not load private key file"). */
static bool refused_login(PGconn *db, const char *state) {
    const char *msg = PQerrorMessage(db);
    return PQconnectionNeedsPassword(db) || strncmp(state, "28", 2) == 0 || strcmp(state, "3D000") == 0 ||
           strstr(msg, "certificate") != NULL || strstr(msg, "private key") != NULL || client_cert_refused(msg);
}

struct db *db_connect_class(const char *url, int *cls, char *err, size_t errlen) {
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
        if (!timed_out && client_cert_refused(PQerrorMessage(db))) { /* say which setting: the URL's */
            size_t len = strlen(err);
            snprintf(err + len, errlen - len, " (TLS: the server refused the client certificate: the URL's "
                                              "sslcert and sslkey)");
        }
        if (cls && refused_login(db, state)) *cls = CV_ECONFIG;
        PQfinish(db);
        return NULL;
    }
    /* a URL of several hosts: never a host that has forked from the others (db_fork.c) */
    if (db_url_hosts(url) > 1 && db_fork_guard(&db, url, app, err, errlen) < 0) return NULL; /* CV_ERETRY */
    PQsetErrorVerbosity(db, PQERRORS_DEFAULT);
    PQsetNoticeProcessor(db, quiet_notice, NULL); /* NOTICEs are not errors; keep stderr JSON-only */
    struct db *ctx = xcalloc(1, sizeof *ctx);
    ctx->conn = db;
    return ctx;
}

struct db *db_connect(const char *url, char *err, size_t errlen) { return db_connect_class(url, NULL, err, errlen); }

/* backoff_open's view of db_connect_class. */
static void *open_db(const void *url, int *cls, char *err, size_t errlen) {
    return db_connect_class(url, cls, err, errlen);
}

struct db *db_connect_wait(const char *url, volatile sig_atomic_t *stop, char *err, size_t errlen) {
    return backoff_open(open_db, url, "database", stop, err, errlen);
}

struct db *db_connect_retry(const char *url, volatile sig_atomic_t *stop) {
    char err[512], shown[512];
    struct db *db = db_connect_wait(url, stop, err, sizeof err);
    if (!db && err[0]) {
        url_redact(url, shown, sizeof shown);
        log_error("database (%s): %s; stopping (a configuration error is not retried)", shown, err);
    }
    return db;
}

/* The class of a failed statement, from its SQLSTATE and the connection:
 * CV_ERETRY for what passes (no connection, or SQLSTATE class 08 connection,
 * 40001 serialization failure, 40P01 deadlock, 40003 completion unknown, 53
 * out of resources, 55P03 lock timeout, 55006 object in use, 57 operator
 * intervention (statement timeout, shutdown), 58 system error, 25006 a read-only
 * server: a standby after a failover); CV_EREFUSED for every other error, which
 * the same statement would meet again (a constraint violation, bad data, a
 * missing object, a bug). */
static int classify(PGconn *conn, const char *state) {
    if (PQstatus(conn) != CONNECTION_OK) return CV_ERETRY;
    if (!state) return CV_ERETRY; /* no SQLSTATE: the connection broke mid-statement */
    static const char *const transient[] = {"08", "40001", "40P01", "40003", "53", "55P03", "55006",
                                            "57", "58", "25006"};
    for (size_t i = 0; i < sizeof transient / sizeof transient[0]; i++)
        if (strncmp(state, transient[i], strlen(transient[i])) == 0) return CV_ERETRY;
    return CV_EREFUSED;
}

PGconn *db_conn(const struct db *db) { return db->conn; }
bool db_ok(const struct db *db) { return db && PQstatus(db->conn) == CONNECTION_OK; }
bool db_idle_alive(struct db *db) {
    if (!db_ok(db)) return false;
    struct pollfd p = {.fd = PQsocket(db->conn), .events = POLLIN};
    if (poll(&p, 1, 0) <= 0) return true; /* the server said nothing: alive as far as can be told */
    if (!PQconsumeInput(db->conn)) return false;
    PGnotify *n;
    while ((n = PQnotifies(db->conn))) PQfreemem(n);
    return PQstatus(db->conn) == CONNECTION_OK;
}

int db_err(const struct db *db) { return db->err; }
const char *db_errstr(const struct db *db) { return db->errstr; }
const char *db_sqlstate(const struct db *db) { return db->sqlstate; }

/* Sets db's error: its class and text (printf-style). Returns the class. */
static int set_error(struct db *db, int cls, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int set_error(struct db *db, int cls, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(db->errstr, sizeof db->errstr, fmt, ap);
    va_end(ap);
    db->sqlstate[0] = '\0';
    return db->err = cls;
}

/* Writes what went wrong in r into out, safe to log and to store: the primary
 * message, the SQLSTATE and the constraint, table and column when the server
 * names them. Never DETAIL, HINT or CONTEXT: they may carry row contents (a
 * failing row holds a password hash, a duplicate key an email). Without a
 * result (the connection broke) the connection's message. */
static void error_text(PGconn *conn, const PGresult *r, char *out, size_t n) {
    const char *primary = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (!primary) {
        snprintf(out, n, "%s", PQerrorMessage(conn)); /* libpq's own text: no row data */
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

/* Hands a statement's result r (taken) to the caller, or records its error in
 * db (class, text, SQLSTATE), logs it with the first 150 bytes of sql, and
 * returns the class (see db_exec). */
static int db_result(struct db *db, PGresult *r, const char *sql, PGresult **out) {
    if (out) *out = NULL;
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
        if (out) *out = r;
        else PQclear(r);
        return 0;
    }
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    error_text(db->conn, r, db->errstr, sizeof db->errstr);
    snprintf(db->sqlstate, sizeof db->sqlstate, "%s", state ? state : "");
    db->err = classify(db->conn, state);
    char line[160];
    snprintf(line, sizeof line, "%s", sql);
    for (char *p = line; *p; p++) if (*p == '\n') *p = ' ';
    log_msg(db->err == CV_EREFUSED ? LOG_ERROR : LOG_WARN, NULL, "SQL failed: %s [%s]", db->errstr, line);
    PQclear(r);
    return db->err;
}

static uint32_t hash_sql(const char *s) {
    uint32_t h = 2166136261u;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

static int pipeline_run(struct db *db, const char *sql, const char *name, int nparams,
                        const char *const *params, PGresult **out);

int db_flush(struct db *db) { return db->ndeferred ? pipeline_run(db, NULL, NULL, 0, NULL, NULL) : 0; }

/* Sets *name to the statement prepared for sql on db, preparing it if new
 * (NULL when it cannot be remembered: then it runs unprepared). A new one is
 * prepared after db's deferred statements have run, since they may be what
 * makes the transaction usable again (ROLLBACK TO SAVEPOINT). Returns 0, or
 * the error class of those statements or of the PREPARE, which is then the
 * statement's error. */
static int prepare_once(struct db *db, const char *sql, int nparams, const char **name) {
    *name = NULL;
    uint32_t h = hash_sql(sql);
    for (int i = 0; i < db->nstmts; i++)
        if (db->stmts[i].hash == h && strcmp(db->stmts[i].sql, sql) == 0) {
            *name = db->stmts[i].name;
            return 0;
        }
    int rc = db_flush(db);
    if (rc < 0) return rc;
    if (db->nstmts == db->capstmts) {
        db->capstmts = db->capstmts ? 2 * db->capstmts : 32;
        db->stmts = xrealloc(db->stmts, (size_t)db->capstmts * sizeof *db->stmts);
    }
    struct db_stmt *st = &db->stmts[db->nstmts];
    snprintf(st->name, sizeof st->name, "cv%u", ++db->stmt_seq);
    PGresult *r = PQprepare(db->conn, st->name, sql, nparams, NULL);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) return db_result(db, r, sql, NULL);
    PQclear(r);
    st->hash = h;
    st->sql = xstrdup(sql);
    db->nstmts++;
    *name = st->name;
    return 0;
}

void db_release_results(struct db *db) {
    for (int i = 0; i < db->nslots; i++) {
        PQclear(db->slots[i].r);
        db->slots[i] = (struct db_slot){0};
    }
}

void db_close(struct db *db) {
    if (!db) return;
    db_discard(db);
    db_release_results(db);
    for (int i = 0; i < db->nstmts; i++) free(db->stmts[i].sql);
    free(db->stmts);
    free(db->deferred);
    free(db->slots);
    PQfinish(db->conn);
    free(db);
}

void db_discard(struct db *db) {
    for (int i = 0; i < db->ndeferred; i++) {
        struct db_deferred *d = &db->deferred[i];
        for (int j = 0; j < d->nparams; j++) free(d->params[j]);
        free(d->params);
        free(d->sql);
        if (d->handle >= 0) db->slots[d->handle].ran = true; /* never will: nothing to wait for */
    }
    db->ndeferred = 0;
}

/* Defers sql; with keep, its result is kept for the handle returned. Returns
 * the handle (0 without keep), or the error class of the statements that had
 * to run first to prepare it (then nothing stays deferred). */
static int defer(struct db *db, const char *sql, int nparams, const char *const *params, bool keep) {
    const char *name = NULL;
    int rc = nparams > 0 ? prepare_once(db, sql, nparams, &name) : 0; /* SAVEPOINT, BEGIN: unprepared */
    if (rc < 0) return rc;
    int h = -1;
    if (keep) {
        for (h = 0; h < db->nslots && db->slots[h].used;) h++;
        if (h == db->nslots) {
            db->nslots = db->nslots ? 2 * db->nslots : 16;
            db->slots = xrealloc(db->slots, (size_t)db->nslots * sizeof *db->slots);
            for (int i = h; i < db->nslots; i++) db->slots[i] = (struct db_slot){0};
        }
        db->slots[h] = (struct db_slot){.used = true};
    }
    if (db->ndeferred == db->capdeferred) {
        db->capdeferred = db->capdeferred ? 2 * db->capdeferred : 32;
        db->deferred = xrealloc(db->deferred, (size_t)db->capdeferred * sizeof *db->deferred);
    }
    struct db_deferred *d = &db->deferred[db->ndeferred++];
    d->sql = xstrdup(sql);
    d->name = name;
    d->handle = h;
    d->nparams = nparams;
    d->params = nparams > 0 ? xcalloc((size_t)nparams, sizeof *d->params) : NULL;
    for (int j = 0; j < nparams; j++) d->params[j] = params[j] ? xstrdup(params[j]) : NULL;
    return keep ? h : 0;
}

int db_defer(struct db *db, const char *sql, int nparams, const char *const *params) {
    return defer(db, sql, nparams, params, false);
}

int db_defer_result(struct db *db, const char *sql, int nparams, const char *const *params) {
    return defer(db, sql, nparams, params, true);
}

int db_take_result(struct db *db, int handle, PGresult **out) {
    *out = NULL;
    if (handle < 0 || handle >= db->nslots || !db->slots[handle].used)
        return set_error(db, CV_EREFUSED, "no deferred result %d (a bug)", handle);
    int rc = db->slots[handle].ran ? 0 : db_flush(db);
    *out = db->slots[handle].r;
    db->slots[handle] = (struct db_slot){0};
    if (rc < 0) { /* a later statement of that run failed: its result is no use to the caller */
        PQclear(*out);
        *out = NULL;
    }
    return rc;
}

/* Sends one statement into the open pipeline. Returns 1 when sent. */
static int pipeline_send(PGconn *conn, const char *sql, const char *name, int nparams, const char *const *params) {
    return name ? PQsendQueryPrepared(conn, name, nparams, params, NULL, NULL, 0)
                : PQsendQueryParams(conn, sql, nparams, NULL, params, NULL, NULL, 0);
}

/* Sends the deferred statements and then sql (one statement; NULL: none) in
 * one pipeline, and reads every result: each deferred one's goes to its slot,
 * sql's to *out. Returns as db_exec, with the first error among them (the
 * statements after a failed one do not run, and their slots stay NULL).
 * Nothing stays deferred. */
static int pipeline_run(struct db *db, const char *sql, const char *name, int nparams,
                        const char *const *params, PGresult **out) {
    PGconn *conn = db->conn;
    PGresult *failed = NULL, *mine = NULL;
    int n = db->ndeferred, total = n + (sql != NULL);
    struct db_deferred *deferred = db->deferred;
    const char *failed_sql = sql ? sql : n ? deferred[n - 1].sql : "";
    bool ok = PQenterPipelineMode(conn) == 1;
    for (int i = 0; ok && i < n; i++)
        ok = pipeline_send(conn, deferred[i].sql, deferred[i].name, deferred[i].nparams,
                           (const char *const *)deferred[i].params) == 1;
    if (sql) ok = ok && pipeline_send(conn, sql, name, nparams, params) == 1;
    ok = ok && PQpipelineSync(conn) == 1;
    /* one result per statement, each followed by NULL, then the sync */
    int i = 0, nulls = 0;
    while (ok) {
        PGresult *r = PQgetResult(conn);
        if (!r) {
            if (++nulls > 1 || PQstatus(conn) != CONNECTION_OK) ok = false; /* nothing more will come */
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
        } else if (i < n && deferred[i].handle >= 0 && !failed) {
            db->slots[deferred[i].handle].r = r;
        } else {
            PQclear(r);
        }
        i++;
    }
    if (i != total) ok = false;
    if (PQpipelineStatus(conn) != PQ_PIPELINE_OFF && PQexitPipelineMode(conn) != 1) ok = false;
    char keep_sql[160]; /* db_result shows this much of it */
    snprintf(keep_sql, sizeof keep_sql, "%s", failed_sql);
    db_discard(db); /* their slots are marked ran */
    if (failed) {
        PQclear(mine);
        return db_result(db, failed, keep_sql, out);
    }
    if (!ok) {
        PQclear(mine);
        return db_result(db, NULL, keep_sql, out); /* the connection broke */
    }
    return sql ? db_result(db, mine, keep_sql, out) : 0;
}

int db_exec(struct db *db, const char *sql, int nparams, const char *const *params, PGresult **out) {
    const char *name;
    if (out) *out = NULL;
    int rc = prepare_once(db, sql, nparams, &name);
    if (rc < 0) {
        db_discard(db);
        return rc;
    }
    if (db->ndeferred) return pipeline_run(db, sql, name, nparams, params, out);
    PGresult *r = name ? PQexecPrepared(db->conn, name, nparams, params, NULL, NULL, 0)
                       : PQexecParams(db->conn, sql, nparams, NULL, params, NULL, NULL, 0);
    return db_result(db, r, sql, out);
}

int db_cmd(struct db *db, const char *sql) {
    if (db->ndeferred) return pipeline_run(db, sql, NULL, 0, NULL, NULL);
    return db_result(db, PQexec(db->conn, sql), sql, NULL);
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
