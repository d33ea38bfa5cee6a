/* db_fork.c - a forked primary among the hosts of a multi-host URL.
 *
 * libpq's multi-host URL (host=a,b target_session_attrs=read-write) keeps the
 * first host in list order that takes writes. After a failover the promoted
 * standby runs on a new timeline; an old primary that comes back writable
 * (not fenced, not rewound) is still on the old one, and when it is listed
 * first libpq picks it: writes would go to a database that has forked from
 * the promoted one. db_fork_guard looks, after each connection through a URL
 * of several hosts, at every host of the URL on its own, and never lets a
 * process write to a host that another host of the same system (system
 * identifier) has overtaken (a later timeline). The only state kept is the
 * process's memory of the newest timeline it has written on (see
 * db_fork_guard); everything else is read afresh at each connection. */
#include "core.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* How long the other hosts of the URL are given to answer (all at once): a
 * host that does not is not known, and cannot make a connection refused. */
#define PROBE_MS 1000
#define HOSTS_MAX 16

/* What a host says about itself: its system, whether it takes writes, and
 * then its timeline (the one its WAL is written on now; pg_control_checkpoint's
 * timeline_id lags after a promotion until the next checkpoint). */
static const char IDENTIFY_SQL[] =
    "SELECT system_identifier::text, pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN 0 "
    "ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END "
    "FROM pg_control_system()";

struct host_id {
    bool known;    /* it answered */
    bool writable; /* not in recovery */
    char sysid[24];
    unsigned long tli; /* 0 when in recovery */
};

/* The process's memory: the newest timeline of system seen_sysid it has had a
 * writable connection on. A host of that system on an earlier timeline has
 * forked from it, whatever the other hosts say (they may be unreachable).
 * Under seen_lock: the HTTP listener connects from two threads. */
static pthread_mutex_t seen_lock = PTHREAD_MUTEX_INITIALIZER;
static char seen_sysid[24];
static unsigned long seen_tli;

/* The timeline this process has written on for system sysid (0: none). */
static unsigned long seen_timeline(const char *sysid) {
    pthread_mutex_lock(&seen_lock);
    unsigned long tli = strcmp(seen_sysid, sysid) == 0 ? seen_tli : 0;
    pthread_mutex_unlock(&seen_lock);
    return tli;
}

/* Remembers that this process has a writable connection on timeline tli of system sysid. */
static void seen_remember(const char *sysid, unsigned long tli) {
    pthread_mutex_lock(&seen_lock);
    if (strcmp(seen_sysid, sysid) != 0 || tli > seen_tli) {
        snprintf(seen_sysid, sizeof seen_sysid, "%s", sysid);
        seen_tli = tli;
    }
    pthread_mutex_unlock(&seen_lock);
}

/* Reads id from r (IDENTIFY_SQL's result); id->known false when r is not one. */
static void identify_result(PGresult *r, struct host_id *id) {
    *id = (struct host_id){0};
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1 || PQnfields(r) != 3) return;
    snprintf(id->sysid, sizeof id->sysid, "%s", PQgetvalue(r, 0, 0));
    id->writable = PQgetvalue(r, 0, 1)[0] == 'f';
    id->tli = strtoul(PQgetvalue(r, 0, 2), NULL, 10);
    id->known = true;
}

/* The i-th item of a comma-separated libpq list into out ("" when the list
 * has fewer; a list of one item gives it for every i, as libpq does with a
 * single port for several hosts). */
static void list_item(const char *list, int i, char *out, size_t n) {
    out[0] = '\0';
    if (!list) return;
    if (!strchr(list, ',')) {
        snprintf(out, n, "%s", list);
        return;
    }
    for (const char *p = list; p; i--) {
        size_t len = strcspn(p, ",");
        if (i == 0) {
            snprintf(out, n, "%.*s", (int)len, p);
            return;
        }
        p = p[len] ? p + len + 1 : NULL;
    }
}

/* The number of items of a comma-separated list (0 for NULL or ""). */
static int list_len(const char *list) {
    if (!list || !*list) return 0;
    int n = 1;
    for (const char *p = list; *p; p++) n += *p == ',';
    return n;
}

static const char *opt(const PQconninfoOption *opts, const char *key) {
    for (const PQconninfoOption *o = opts; o->keyword; o++)
        if (strcmp(o->keyword, key) == 0) return o->val;
    return NULL;
}

int db_url_hosts(const char *url) {
    PQconninfoOption *opts = PQconninfoParse(url, NULL);
    if (!opts) return 0;
    int h = list_len(opt(opts, "host")), a = list_len(opt(opts, "hostaddr"));
    PQconninfoFree(opts);
    int n = h > a ? h : a;
    return n ? n : 1; /* none named: libpq's default, one */
}

/* One host of a parsed URL: its parameters as keywords and values for
 * PQconnectStartParams (expand_dbname 0), every one the URL gives, with host,
 * hostaddr and port its own, and target_session_attrs tsa. The strings live
 * in h (and in opts, the URL's parse) until h is dropped. */
struct host_params {
    const char *keys[64];
    const char *vals[64];
    char host[256], hostaddr[64], port[16], name[300];
};

static void host_params(const PQconninfoOption *opts, int i, const char *tsa, const char *app,
                        struct host_params *h) {
    list_item(opt(opts, "host"), i, h->host, sizeof h->host);
    list_item(opt(opts, "hostaddr"), i, h->hostaddr, sizeof h->hostaddr);
    list_item(opt(opts, "port"), i, h->port, sizeof h->port);
    snprintf(h->name, sizeof h->name, "%s:%s", h->host[0] ? h->host : h->hostaddr[0] ? h->hostaddr : "localhost",
             h->port[0] ? h->port : "5432");
    int k = 0;
    for (const PQconninfoOption *o = opts; o->keyword && k < 58; o++) {
        if (!o->val || !*o->val) continue;
        if (!strcmp(o->keyword, "host") || !strcmp(o->keyword, "hostaddr") || !strcmp(o->keyword, "port") ||
            !strcmp(o->keyword, "target_session_attrs") || !strcmp(o->keyword, "application_name"))
            continue;
        h->keys[k] = o->keyword, h->vals[k++] = o->val;
    }
    if (h->host[0]) h->keys[k] = "host", h->vals[k++] = h->host;
    if (h->hostaddr[0]) h->keys[k] = "hostaddr", h->vals[k++] = h->hostaddr;
    if (h->port[0]) h->keys[k] = "port", h->vals[k++] = h->port;
    h->keys[k] = "target_session_attrs", h->vals[k++] = tsa;
    h->keys[k] = "application_name", h->vals[k++] = app;
    h->keys[k] = NULL, h->vals[k] = NULL;
}

/* A host being asked who it is. */
struct probe {
    PGconn *c;
    enum { CONNECTING, ASKING, DONE } phase;
    PostgresPollingStatusType st;
    struct host_id id;
};

/* Moves p on after its socket was ready (or at start). */
static void probe_step(struct probe *p) {
    if (p->phase == CONNECTING) {
        p->st = PQconnectPoll(p->c);
        if (p->st == PGRES_POLLING_FAILED) p->phase = DONE;
        else if (p->st == PGRES_POLLING_OK) p->phase = PQsendQuery(p->c, IDENTIFY_SQL) == 1 ? ASKING : DONE;
        return;
    }
    if (p->phase != ASKING) return;
    if (!PQconsumeInput(p->c)) {
        p->phase = DONE;
        return;
    }
    while (!PQisBusy(p->c)) {
        PGresult *r = PQgetResult(p->c);
        if (!r) {
            p->phase = DONE;
            return;
        }
        if (!p->id.known) identify_result(r, &p->id);
        PQclear(r);
    }
}

/* Asks hosts[0..n-1] (those with skip[i] false) who they are, all at once,
 * for at most PROBE_MS; ids[i].known is false for a host that did not say. */
static void probe_hosts(const PQconninfoOption *opts, int n, const bool *skip, const char *app,
                        struct host_id *ids) {
    struct probe probes[HOSTS_MAX] = {0};
    for (int i = 0; i < n; i++) {
        probes[i].phase = DONE;
        if (skip[i]) continue;
        struct host_params h;
        host_params(opts, i, "any", app, &h);
        probes[i].c = PQconnectStartParams(h.keys, h.vals, 0);
        if (!probes[i].c || PQstatus(probes[i].c) == CONNECTION_BAD) continue;
        probes[i].phase = CONNECTING;
        probes[i].st = PGRES_POLLING_WRITING;
    }
    int64_t deadline = clock_mono_ms() + PROBE_MS;
    for (;;) {
        struct pollfd fds[HOSTS_MAX];
        int which[HOSTS_MAX], nfds = 0;
        for (int i = 0; i < n; i++) {
            if (probes[i].phase == DONE) continue;
            bool in = probes[i].phase == ASKING || probes[i].st == PGRES_POLLING_READING;
            fds[nfds] = (struct pollfd){PQsocket(probes[i].c), in ? POLLIN : POLLOUT, 0};
            which[nfds++] = i;
        }
        int wait = (int)(deadline - clock_mono_ms());
        if (nfds == 0 || wait <= 0) break;
        int got = poll(fds, (nfds_t)nfds, wait);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        for (int k = 0; k < nfds; k++)
            if (fds[k].revents) probe_step(&probes[which[k]]);
    }
    for (int i = 0; i < n; i++) {
        ids[i] = probes[i].id;
        if (probes[i].c) PQfinish(probes[i].c);
    }
}

/* True when item i of the URL is the host conn is connected to. */
static bool is_connected_host(const PGconn *conn, const PQconninfoOption *opts, int i) {
    struct host_params h;
    host_params(opts, i, "any", "", &h);
    const char *host = PQhost(conn), *port = PQport(conn);
    bool same_host = host && (strcmp(host, h.host[0] ? h.host : h.hostaddr) == 0);
    return same_host && port && (strcmp(port, h.port) == 0 || !h.port[0]);
}

/* Opens host i of the URL (read-write) and checks it is writable on
 * timeline tli (or later) of system sysid. Returns the connection, or NULL
 * with why in err. */
static PGconn *open_host(const PQconninfoOption *opts, int i, const char *app, const char *sysid,
                         unsigned long tli, const char *url, char *err, size_t errlen) {
    struct host_params h;
    host_params(opts, i, "read-write", app, &h);
    PGconn *c = PQconnectdbParams(h.keys, h.vals, 0);
    if (!c || PQstatus(c) != CONNECTION_OK) {
        char text[512];
        snprintf(text, sizeof text, "%s", c ? PQerrorMessage(c) : "out of memory");
        for (size_t k = strlen(text); k && (text[k - 1] == '\n' || text[k - 1] == ' ');) text[--k] = '\0';
        url_scrub(text, url, err, errlen);
        PQfinish(c);
        return NULL;
    }
    struct host_id id;
    PGresult *r = PQexec(c, IDENTIFY_SQL);
    identify_result(r, &id);
    PQclear(r);
    if (!id.known || !id.writable || strcmp(id.sysid, sysid) != 0 || id.tli < tli) {
        snprintf(err, errlen, "host %s changed while it was being opened", h.name);
        PQfinish(c);
        return NULL;
    }
    return c;
}

int db_fork_guard(PGconn **conn, const char *url, const char *app, char *err, size_t errlen) {
    struct host_id ours;
    PGresult *r = PQexec(*conn, IDENTIFY_SQL);
    identify_result(r, &ours);
    if (!ours.known) { /* not told: the connection is used as libpq chose it, as before this check */
        const char *why = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
        log_warn("database: cannot tell whether the host has forked (%s); using it", why ? why : "no answer");
        PQclear(r);
        return 0;
    }
    PQclear(r);
    if (!ours.writable) return 0; /* nothing is written through it: nothing to fork */
    PQconninfoOption *opts = PQconninfoParse(url, NULL);
    if (!opts) return 0; /* parsed before libpq connected: only out of memory */
    int n = db_url_hosts(url);
    if (n > HOSTS_MAX) n = HOSTS_MAX;
    bool skip[HOSTS_MAX] = {0};
    int mine = -1;
    for (int i = 0; i < n; i++)
        if (mine < 0 && is_connected_host(*conn, opts, i)) skip[mine = i] = true;
    struct host_id ids[HOSTS_MAX];
    probe_hosts(opts, n, skip, app, ids);
    /* the newest writable host of the same system among the others */
    int best = -1;
    for (int i = 0; i < n; i++)
        if (ids[i].known && ids[i].writable && strcmp(ids[i].sysid, ours.sysid) == 0 && ids[i].tli > ours.tli &&
            (best < 0 || ids[i].tli > ids[best].tli))
            best = i;
    struct host_params me;
    if (mine >= 0) host_params(opts, mine, "any", app, &me);
    else snprintf(me.name, sizeof me.name, "%s:%s", PQhost(*conn) ? PQhost(*conn) : "?",
                  PQport(*conn) ? PQport(*conn) : "?");
    int rc = 0;
    if (best >= 0) {
        struct host_params to;
        host_params(opts, best, "read-write", app, &to);
        char why[512];
        PGconn *c = open_host(opts, best, app, ours.sysid, ids[best].tli, url, why, sizeof why);
        if (c) {
            log_warn("database: skipped host %s, which has forked: it takes writes on timeline %lu, and host %s "
                     "of the same system (%s) takes writes on timeline %lu, a later one (a promoted standby); "
                     "writing to %s. Fence %s (docs/scaling.md)",
                     me.name, ours.tli, to.name, ours.sysid, ids[best].tli, to.name, me.name);
            PQfinish(*conn);
            *conn = c;
            ours = ids[best];
        } else {
            snprintf(err, errlen, "host %s has forked (timeline %lu; host %s of the same system is on timeline %lu) "
                     "and %s cannot be opened: %s; not writing to %s", me.name, ours.tli, to.name, ids[best].tli,
                     to.name, why, me.name);
            rc = CV_ERETRY;
        }
    } else if (ours.tli < seen_timeline(ours.sysid)) {
        snprintf(err, errlen, "host %s has forked: it takes writes on timeline %lu of system %s, and this process "
                 "wrote on timeline %lu of it (a promoted standby, not reachable now); not writing to %s. "
                 "Fence %s (docs/scaling.md)", me.name, ours.tli, ours.sysid, seen_timeline(ours.sysid), me.name,
                 me.name);
        rc = CV_ERETRY;
    }
    if (rc == 0) {
        /* a forked host that libpq did not choose (it comes later in the list) is said too */
        for (int i = 0; i < n; i++)
            if (ids[i].known && ids[i].writable && strcmp(ids[i].sysid, ours.sysid) == 0 && ids[i].tli < ours.tli) {
                struct host_params old;
                host_params(opts, i, "any", app, &old);
                log_warn("database: host %s has forked: it takes writes on timeline %lu of system %s, which is on "
                         "timeline %lu; not writing to it. Fence it (docs/scaling.md)",
                         old.name, ids[i].tli, ours.sysid, ours.tli);
            }
        seen_remember(ours.sysid, ours.tli);
    } else {
        PQfinish(*conn);
        *conn = NULL;
    }
    PQconninfoFree(opts);
    return rc;
}
