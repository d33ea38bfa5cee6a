/* http.h - inside the pool's HTTP child (workers/http/): what http.c (the
 * listener, probes), metrics.c (/metrics), rollup.c (numbers over time),
 * dashboard.c (the page and its reading API), http_action.c (its actions),
 * reply.c (answers) and request.c (a request's connections and token)
 * share. Calls go one way: http.c routes to dashboard.c and http_action.c,
 * and all of them use reply.c and request.c, which call back into none. Everything here runs in that child only; the rest of the pool sees
 * only http_run (workers.h). */
#ifndef CONVEYOR_HTTP_H
#define CONVEYOR_HTTP_H

#include "workers.h"

#include <microhttpd.h>
#include <pthread.h>

/* ---- http.c / metrics.c: the pool's HTTP listener ----------------------------------- */
/* What the HTTP child samples every few seconds (never per request). */
struct http_sample {
    bool sampled;                  /* a sample was taken */
    bool db_up, migrations_ok;
    bool broker_used[2], broker_up[2]; /* by enum transport */
    long outbox_pending;
    double outbox_oldest_s;
    int nqueues;
    struct queue_counts *queues;   /* by cfg queue index (counts of a broker that is down: 0) */
    char *recent;                  /* the last 20 processed commands, a JSON array (NULL: not read) */
    struct parked_queue_stat *parked; /* by cfg queue index: parked commands (sampled every 10 s; 0 before) */
    struct lane_count **lanes;     /* by cfg queue index: a laned queue's lanes (LANE_CLASSES * lanes, class
                                    * by class; sampled with the brokers, depth 0 and age -1 before), else NULL */
    int nschedules;
    struct schedule_state *schedules; /* by cfg schedule index: their rows (sampled; zeroed before) */
    int nrate_limits;
    struct rate_limit_state *limits;  /* by cfg rate limit index: tokens, counts (sampled; full before) */
    int nproducers;
    struct forward_state *producers;  /* by cfg producer index: its outbox's counts (sampled; unread before) */
    int nsubscriptions;
    struct subscription_row *subscriptions; /* the registry's rows (subscription_view.c; sampled), owned */
};
/* An embedded file of the dashboard (cmake/embed_assets.cmake): path "/" or
 * "/app.js"..., its content type and bytes. The array ends with a NULL path. */
struct asset {
    const char *path, *type;
    const unsigned char *data;
    size_t len;
};
extern const struct asset dashboard_assets[];
/* Appends the Prometheus text exposition (0.0.4) of the scoreboard and sample s
 * to *buf (malloc'd, *len bytes, NUL-terminated; the caller frees it). */
void metrics_render(const struct cfg *cfg, const struct http_sample *s, char **buf, size_t *len);

/* ---- rollup.c: the dashboard's numbers over time (the HTTP child) --------------- */
struct rollup;
/* A queue now: commands ended since the pool started, per second over the last
 * 10 s, and the latency percentiles of the last minute (seconds; NAN: none). */
struct rollup_live {
    uint64_t done;
    double rate, p50, p99;
};
/* The rollups of cfg's queues, counting from now; rollup_free frees. */
struct rollup *rollup_new(const struct cfg *cfg);
void rollup_free(struct rollup *r);
/* Main thread, every second: a snapshot of the scoreboard; at a new minute the
 * last one's counts are added into metrics_minute through db (NULL or a
 * failure: tried again next tick); hourly, rows older than 7 days deleted. */
void rollup_tick(struct rollup *r, struct db *db);
/* Main thread, on stop: the minute so far written (a failure: logged, lost). */
void rollup_flush(struct rollup *r, struct db *db);
/* Any thread: queue qi (cfg index) now, into *out. */
void rollup_live(struct rollup *r, int qi, struct rollup_live *out);
/* Any thread: the last hour (60 one-minute steps) or day (288 five-minute
 * steps) as /api/history's JSON (caller frees), read through db, the running
 * minute added from memory; NULL with err when the database fails. */
cJSON *rollup_history(struct rollup *r, struct db *db, bool day, char *err, size_t errlen);

#define HTTP_BODY_MAX 65536 /* a POST body longer than this is refused (413) */

struct http {
    const struct cfg *cfg;
    bool loopback;              /* http.listen is a loopback address: reading needs no token */
    pthread_mutex_t lock;       /* guards sample */
    struct http_sample sample;  /* the last one (its queues and recent owned) */
    struct rollup *rollup;
    /* the sampler's connections (main thread only) */
    struct db *db;
    struct broker *broker[2];
    /* the request threads' connections, opened on first use; held by one
     * request at a time (req_lock), so the probes and the overview, which
     * take no connection, never wait behind a slow query or broker */
    pthread_mutex_t req_lock;
    struct db *req_db;
    struct broker *req_broker[2];
    int port;                   /* of http.listen, for the Host check */
};

/* ---- reply.c: answers ------------------------------------------------------------- */
/* Queues a response (body: copied, or with must_free taken and freed) with the
 * headers every response carries (CSP, nosniff, no-store). */
enum MHD_Result http_reply(struct MHD_Connection *conn, unsigned status, const char *type, const char *body,
                           size_t len, bool must_free);
/* http_reply with an Allow header (a 405). */
enum MHD_Result http_reply_allow(struct MHD_Connection *conn, unsigned status, const char *type, const char *body,
                                 size_t len, bool must_free, const char *allow);
/* A text/plain response of body (copied). */
enum MHD_Result http_text(struct MHD_Connection *conn, unsigned status, const char *body);
/* A JSON response of o, which it frees. */
enum MHD_Result http_json(struct MHD_Connection *conn, unsigned status, cJSON *o);
/* A JSON error {"error": message}. */
enum MHD_Result http_error(struct MHD_Connection *conn, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* A 503 for a dependency that failed: logs what (the operator's words) and
 * detail (a server's own text, never sent to the client) under a fresh error
 * id, and answers {"error": "<what> (error <id> in the pool's log)",
 * "errorId": "<id>"}. */
enum MHD_Result http_unavailable(struct MHD_Connection *conn, const char *what, const char *detail);
/* ---- request.c: a request's connections and token --------------------------------- */
/* The request threads' database (statement_timeout 5 s) or broker of transport
 * t, connected on first use, after a failure, and when the server closed the
 * database connection while it was idle (a restart: db_idle_alive); NULL with
 * err when it cannot. The caller holds req_lock. */
struct db *http_req_db(struct http *h, char *err, size_t errlen);
struct broker *http_req_broker(struct http *h, enum transport t, char *err, size_t errlen);
/* After a request failed on it: closes the request thread's database / broker of t. */
void http_req_db_lost(struct http *h);
void http_req_broker_lost(struct http *h, enum transport t);
/* True when the request carries the token (Authorization: Bearer, compared in
 * constant time); false when it does not or no token is configured. */
bool http_has_token(const struct http *h, struct MHD_Connection *conn);

/* dashboard.c: true when url is one of the page's embedded assets. */
bool dashboard_is_asset(const char *url);
/* dashboard.c: GET of an asset or /api/...: the response queued. */
enum MHD_Result dashboard_get(struct http *h, struct MHD_Connection *conn, const char *url);
/* http_action.c: a POST to /api/... with its body (len bytes, not NUL-terminated,
 * or too_big): checked (origin, token, type, body) and done; the response queued. */
enum MHD_Result http_action(struct http *h, struct MHD_Connection *conn, const char *url, const char *body, size_t len,
                            bool too_big);

#endif
