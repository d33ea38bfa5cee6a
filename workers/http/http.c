/* http.c - the pool's HTTP listener (http.listen), a child of its own that
 * never handles commands: workers do not wait for it, and it runs at a lower
 * CPU priority (nice 10).
 *
 *   GET /livez    200 while the supervisor runs its loop (it ticks the
 *                 scoreboard every 200 ms; none for 5 s: 503). No dependency
 *                 is checked: a failing liveness probe restarts the pod.
 *   GET /readyz   200 when the database answers, each broker the pool uses is
 *                 connected, the migrations are applied, every queue has a live
 *                 worker and the pool is not draining; else 503. Either way a
 *                 JSON object names each check and its state.
 *   GET /metrics  the Prometheus text exposition (metrics.c).
 *   GET /, /api/... the dashboard (dashboard.c); POST /api/... its actions
 *                 (http_action.c).
 *
 * Requests are served by a pool of HTTP_THREADS libmicrohttpd threads; what
 * needs a connection (the dashboard's history, dead letters, command page and
 * actions) takes req_lock, so a probe never waits behind it. On a loopback
 * listener the page and its API answer only requests whose Host is this
 * listener (421 else): a DNS-rebound name cannot read them. The
 * main thread samples the database (outbox, migrations) every SAMPLE_MS, the
 * recent commands every RECENT_MS and the brokers (queue counts: on RabbitMQ a
 * dozen passive declares per queue, which cost the broker measurably when done
 * every second) every BROKER_SAMPLE_MS, the schedules' rows every SAMPLE_MS,
 * the rate limits' buckets every SAMPLE_MS, the durable subscriptions' registry
 * rows every SAMPLE_MS (counted on their brokers into the registry with the
 * brokers' sample: subscription_count.c), and the parked commands' counts (a count walks an index of every parked
 * row: 0.3 to 1 s for a million) every PARKED_SAMPLE_MS, or less often when a
 * count takes long (PARKED_COST: the counts take at most 1% of the time), on
 * connections of its own, so /metrics and /readyz never run a query; and it ticks the dashboard's
 * rollups (rollup.c) every SAMPLE_MS. Any other path is 404, any other method 405; a request
 * libmicrohttpd cannot parse gets its 400. Every response has a strict
 * Content-Security-Policy (the page's own script and style only), nosniff and
 * no-store.
 */
#include "http.h"

#include <sodium.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <unistd.h>

#define SAMPLE_MS 1000
#define BROKER_SAMPLE_MS 5000
#define PARKED_SAMPLE_MS 10000
#define PARKED_COST 100 /* the parked counts are sampled again after at least this many times their duration */
#define RECENT_MS 250
#define HTTP_THREADS 4
#define LIVE_WITHIN_MS 5000 /* the supervisor's last tick: older, /livez says 503 */
#define BIND_WAIT_MS 10000  /* after a reload, how long the address is tried again */

/* True while the supervisor's loop ticks. */
static bool supervisor_live(void) {
    const struct scoreboard *sb = scoreboard_get();
    if (!sb) return true; /* nothing to tell from: the process is up */
    return clock_mono_ms() - __atomic_load_n(&sb->supervisor_tick_ms, __ATOMIC_RELAXED) < LIVE_WITHIN_MS;
}

/* True when some worker of q is consuming (idle or busy). */
static bool queue_live(const struct cfg_queue *q) {
    const struct scoreboard *sb = scoreboard_get();
    for (int k = 0; sb && k < sb->nslots; k++) {
        const struct sb_slot *s = &sb->slot[k];
        if (!sb_is_worker_of(s, q)) continue;
        int st = __atomic_load_n(&s->state, __ATOMIC_RELAXED);
        if (st == SB_IDLE || st == SB_BUSY) return true;
    }
    return false;
}

/* /readyz: every check, named, in a JSON object; 200 when all are "ok". */
static enum MHD_Result readyz(struct http *h, struct MHD_Connection *conn) {
    cJSON *o = cJSON_CreateObject(), *checks = cJSON_CreateObject();
    bool ready = true;
    pthread_mutex_lock(&h->lock);
    struct http_sample s = h->sample;
    pthread_mutex_unlock(&h->lock);
#define CHECK(name, ok, why)                                                    \
    do {                                                                        \
        bool ok_ = (ok);                                                        \
        ready &= ok_;                                                           \
        cJSON_AddStringToObject(checks, (name), ok_ ? "ok" : (why));           \
    } while (0)
    CHECK("database", s.db_up, s.sampled ? "unreachable" : "not sampled yet");
    CHECK("migrations", s.migrations_ok, s.db_up ? "pending" : "unknown (no database)");
    for (int t = TRANSPORT_RABBITMQ; t <= TRANSPORT_REDIS; t++)
        if (s.broker_used[t]) CHECK(transport_name((enum transport)t), s.broker_up[t], "not connected");
    for (int i = 0; i < h->cfg->nqueues; i++) {
        char name[CFG_NAME_MAX + 16];
        snprintf(name, sizeof name, "workers.%s", h->cfg->queues[i].name);
        CHECK(name, queue_live(&h->cfg->queues[i]), "no live worker");
    }
    /* a broker that does not answer one of the pool's processes (broker_stall.c) */
    char stall[256] = "";
    for (int t = TRANSPORT_RABBITMQ; t <= TRANSPORT_REDIS; t++) {
        char who[CFG_NAME_MAX + 16];
        int n = s.broker_used[t] ? broker_stalled_count(h->cfg, (enum transport)t, who, sizeof who) : 0;
        if (n && !stall[0])
            snprintf(stall, sizeof stall, "stalled: %s does not answer %d process%s (the first: the %s)",
                     transport_name((enum transport)t), n, n == 1 ? "" : "es", who);
    }
    CHECK("broker_stall", !stall[0], stall);
    const struct scoreboard *sb = scoreboard_get();
    CHECK("draining", !(sb && __atomic_load_n(&sb->draining, __ATOMIC_RELAXED)), "draining");
    /* the database breaker (breaker.c): ok only while closed */
    char breaker[400];
    CHECK("breaker", breaker_read(breaker, sizeof breaker, NULL) == BREAKER_CLOSED, breaker);
#undef CHECK
    cJSON_AddStringToObject(o, "status", ready ? "ready" : "not ready");
    cJSON_AddItemToObject(o, "checks", checks);
    return http_json(conn, ready ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE, o);
}

static enum MHD_Result metrics(struct http *h, struct MHD_Connection *conn) {
    char *buf;
    size_t len;
    pthread_mutex_lock(&h->lock); /* the sample's queue counts are read in place */
    metrics_render(h->cfg, &h->sample, &buf, &len);
    pthread_mutex_unlock(&h->lock);
    return http_reply(conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", buf, len, true);
}

/* True when the request's Host names this listener: 127.0.0.1, localhost,
 * [::1] or the listen address, with its port (only on a loopback listener:
 * elsewhere the API needs the token anyway). */
static bool host_is_ours(const struct http *h, struct MHD_Connection *conn) {
    if (!h->loopback) return true;
    const char *host = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_HOST);
    if (!host) return false;
    if (strcmp(host, h->cfg->http_listen) == 0) return true;
    static const char *const names[] = {"127.0.0.1", "localhost", "[::1]"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char want[64];
        snprintf(want, sizeof want, "%s:%d", names[i], h->port);
        if (strcasecmp(host, want) == 0) return true;
    }
    return false;
}

/* One request's state across libmicrohttpd's calls: a POST's body so far. */
struct request {
    char *body;
    size_t len;
    bool too_big;
};

static void request_done(void *cls, struct MHD_Connection *conn, void **state, enum MHD_RequestTerminationCode why) {
    (void)cls;
    (void)conn;
    (void)why;
    struct request *r = *state;
    if (r) free(r->body);
    free(r);
    *state = NULL;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                              const char *version, const char *upload_data, size_t *upload_data_size, void **state) {
    (void)version;
    struct http *h = cls;
    bool post = strcmp(method, "POST") == 0;
    struct request *r = *state;
    if (!r) { /* the headers: the first call */
        *state = xcalloc(1, sizeof *r);
        return MHD_YES;
    }
    if (*upload_data_size) { /* a body: kept for a POST up to HTTP_BODY_MAX, else dropped */
        if (post && !r->too_big && r->len + *upload_data_size <= HTTP_BODY_MAX) {
            r->body = xrealloc(r->body, r->len + *upload_data_size + 1);
            memcpy(r->body + r->len, upload_data, *upload_data_size);
            r->len += *upload_data_size;
        } else r->too_big = post;
        *upload_data_size = 0;
        return MHD_YES;
    }
    bool probe = strcmp(url, "/livez") == 0 || strcmp(url, "/readyz") == 0 || strcmp(url, "/metrics") == 0;
    bool api = strncmp(url, "/api/", 5) == 0;
    if (!probe && !api && !dashboard_is_asset(url))
        return http_text(conn, MHD_HTTP_NOT_FOUND, "not found: the paths are /, /api/..., /livez, /readyz and /metrics\n");
    if (!probe && !host_is_ours(h, conn))
        return http_text(conn, 421, "misdirected request: the Host header does not name this listener\n");
    if (post && api) {
        pthread_mutex_lock(&h->req_lock);
        enum MHD_Result rc = http_action(h, conn, url, r->body, r->len, r->too_big);
        pthread_mutex_unlock(&h->req_lock);
        return rc;
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        const char *why = api ? "method not allowed: GET reads, POST acts\n" : "method not allowed: use GET\n";
        return http_reply_allow(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", why, strlen(why), false,
                       api ? "GET, HEAD, POST" : "GET, HEAD");
    }
    if (strcmp(url, "/livez") == 0)
        return supervisor_live() ? http_text(conn, MHD_HTTP_OK, "ok\n")
                                 : http_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "the supervisor's loop stopped\n");
    if (strcmp(url, "/readyz") == 0) return readyz(h, conn);
    if (strcmp(url, "/metrics") == 0) return metrics(h, conn);
    if (!api || strcmp(url, "/api/overview") == 0) return dashboard_get(h, conn, url); /* no connection */
    pthread_mutex_lock(&h->req_lock);
    enum MHD_Result rc = dashboard_get(h, conn, url);
    pthread_mutex_unlock(&h->req_lock);
    return rc;
}

/* One sample of the database: up, migrations applied, outbox. */
static void sample_db(struct http *h, struct http_sample *s) {
    if (!h->db) {
        char err[512];
        int cls;
        h->db = db_connect_class(h->cfg->database_url, &cls, err, sizeof err);
        if (!h->db) return;
        (void)db_cmd(h->db, "SET statement_timeout TO 2000; SET jit TO off"); /* jit: no gain on the counts, ~20 ms each */
    }
    int nmig = 0;
    while (migrations[nmig].name) nmig++;
    const char **names = xmalloc((size_t)(nmig ? nmig : 1) * sizeof *names);
    for (int i = 0; i < nmig; i++) names[i] = migrations[i].name;
    char *arr = db_array(names, nmig);
    free(names);
    const char *p[1] = {arr};
    PGresult *r = NULL;
    /* the count walks the outbox_unpublished partial index */
    int rc = db_exec(h->db, "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8, "
                            "(SELECT count(*) FROM schema_migrations WHERE version = ANY($1::text[])) "
                            "FROM outbox WHERE published_at IS NULL", 1, p, &r);
    free(arr);
    if (rc < 0) {
        db_close(h->db);
        h->db = NULL;
        return;
    }
    s->db_up = true;
    s->outbox_pending = atol(PQgetvalue(r, 0, 0));
    s->outbox_oldest_s = atof(PQgetvalue(r, 0, 1));
    s->migrations_ok = atoi(PQgetvalue(r, 0, 2)) == nmig;
    PQclear(r);
    (void)queue_pause_refresh(h->db); /* the dashboard's paused column */
}

/* The dashboard's recent commands as a JSON array (caller frees), read every
 * RECENT_MS by the processed_at index (sql/0005: 20 rows of an index scan);
 * NULL when the database is away. */
static char *sample_recent(struct http *h) {
    PGresult *r;
    if (!h->db || db_exec(h->db, "SELECT coalesce(json_agg(json_build_object('id', id, 'type', type, 'outcome', "
                                 "outcome, 'processedAt', " SQL_RFC3339("processed_at") "))::text, '[]') FROM "
                                 "(SELECT * FROM processed_commands ORDER BY processed_at DESC LIMIT 20) c",
                          0, NULL, &r) < 0)
        return NULL;
    char *json = xstrdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    return json;
}

/* The parked commands of every queue into s->parked, and those waiting for
 * each rate limit's token into s->limits' waiting (true), through the
 * sampler's connection, in a transaction whose statements may take 30 s (not
 * the sampler's 2 s: a million parked rows take up to a second); false when it
 * failed (the last sample stands). *took_ms: how long it took. */
static bool sample_parked(struct http *h, struct http_sample *s, int64_t *took_ms) {
    int64_t t0 = clock_mono_ms();
    bool ok = h->db && db_cmd(h->db, "BEGIN; SET LOCAL statement_timeout TO 30000") == 0 &&
              parked_counts(h->db, h->cfg, s->parked) == 0 && rate_limit_waiting_read(h->db, h->cfg, s->limits) == 0;
    if (h->db) (void)db_cmd(h->db, ok ? "COMMIT" : "ROLLBACK");
    *took_ms = clock_mono_ms() - t0;
    return ok;
}

/* The schedules' rows into s->schedules (true); false when the read failed (the last sample stands). */
static bool sample_schedules(struct http *h, struct http_sample *s) {
    return h->db && schedule_states_read(h->db, h->cfg, s->schedules) == 0;
}

/* The rate limits' buckets into s->limits (true); false when the read failed (the last sample stands). */
static bool sample_limits(struct http *h, struct http_sample *s) {
    return h->db && rate_limit_states_read(h->db, h->cfg, s->limits) == 0;
}

/* The durable subscriptions' registry rows into s (true); false when the read failed (the last sample stands). */
static bool sample_subscriptions(struct http *h, struct http_sample *s) {
    return h->db && subscription_rows_read(h->db, NULL, &s->subscriptions, &s->nsubscriptions) == 0;
}

/* With the brokers' sample: every registered subscription of a transport the
 * pool uses counted on its broker, into the registry (subscription_count.c);
 * a broker that failed is closed (opened again next time). */
static void count_subscriptions(struct http *h) {
    bool failed[2];
    if (!h->db) return;
    int n = subscription_count_all(h->db, h->broker, failed);
    if (n < 0) log_debug("subscriptions not counted: %s", db_errstr(h->db));
    for (int t = 0; t < 2; t++)
        if (failed[t]) {
            broker_close(h->broker[t]);
            h->broker[t] = NULL;
        }
}

/* The producers' outboxes into s->producers (true); false when the read failed (the last sample stands). */
static bool sample_producers(struct http *h, struct http_sample *s) {
    return h->db && forward_states_read(h->db, h->cfg, s->producers) == 0;
}

/* A new sample for cfg, its arrays allocated (zeroed); sample_free frees them. */
static struct http_sample sample_new(const struct cfg *cfg) {
    struct http_sample s = {.nqueues = cfg->nqueues, .nschedules = cfg->nschedules,
                            .nrate_limits = cfg->nrate_limits, .nproducers = cfg->nproducers};
    s.queues = xcalloc((size_t)cfg->nqueues + 1, sizeof *s.queues);
    s.parked = xcalloc((size_t)cfg->nqueues + 1, sizeof *s.parked);
    s.lanes = xcalloc((size_t)cfg->nqueues + 1, sizeof *s.lanes);
    for (int i = 0; i < cfg->nqueues; i++) {
        int n = cfg->queues[i].lanes >= 2 ? LANE_CLASSES * cfg->queues[i].lanes : 0;
        if (n) s.lanes[i] = xcalloc((size_t)n, sizeof **s.lanes);
        for (int k = 0; k < n; k++) s.lanes[i][k].oldest_age_s = -1;
    }
    s.schedules = xcalloc((size_t)cfg->nschedules + 1, sizeof *s.schedules);
    for (int i = 0; i < cfg->nschedules; i++) s.schedules[i].s = &cfg->schedules[i];
    s.limits = xcalloc((size_t)cfg->nrate_limits + 1, sizeof *s.limits);
    for (int i = 0; i < cfg->nrate_limits; i++)
        s.limits[i] = (struct rate_limit_state){.rl = &cfg->rate_limits[i], .tokens = cfg->rate_limits[i].burst};
    s.producers = xcalloc((size_t)cfg->nproducers + 1, sizeof *s.producers);
    for (int i = 0; i < cfg->nproducers; i++)
        s.producers[i] = (struct forward_state){.producer = &cfg->producers[i], .report_age_s = -1};
    return s;
}

/* Frees the arrays of s (not recent, which moves from sample to sample). */
static void sample_free(struct http_sample *s) {
    for (int i = 0; s->lanes && i < s->nqueues; i++) free(s->lanes[i]);
    free(s->lanes);
    free(s->queues);
    free(s->parked);
    free(s->schedules);
    free(s->limits);
    free(s->producers);
    subscription_rows_free(s->subscriptions, s->nsubscriptions);
}

/* One sample of the brokers the pool uses: connected, and each queue's counts. */
static void sample_brokers(struct http *h, struct http_sample *s) {
    for (int t = TRANSPORT_RABBITMQ; t <= TRANSPORT_REDIS; t++) {
        if (!(s->broker_used[t] = cfg_uses(h->cfg, (enum transport)t))) continue;
        char err[512];
        int cls;
        if (!h->broker[t] && !(h->broker[t] = broker_open_class(h->cfg, (enum transport)t, &cls, err, sizeof err)))
            continue;
        bool ok = true;
        for (int i = 0; i < h->cfg->nqueues && ok; i++) {
            const struct cfg_queue *q = &h->cfg->queues[i];
            if (q->transport != (enum transport)t) continue;
            ok = broker_queue_counts(h->broker[t], q, &s->queues[i]) == 0;
            /* a lane count that fails leaves the lanes as they were (the queue's counts stand) */
            if (ok && s->lanes[i] && broker_lane_counts(h->broker[t], q, s->lanes[i]) < 0)
                log_debug("lanes of %s not counted: %s", q->name, broker_error(h->broker[t]));
            /* RabbitMQ's oldest ages: what the pools' workers hold (pool_load.c) */
            else if (ok && s->lanes[i] && t == TRANSPORT_RABBITMQ && h->db &&
                     pool_load_lane_ages(h->db, q, s->lanes[i]) < 0)
                log_debug("lanes' oldest of %s not read: %s", q->name, db_errstr(h->db));
        }
        if (!ok) {
            broker_close(h->broker[t]);
            h->broker[t] = NULL;
            continue;
        }
        s->broker_up[t] = true;
    }
}

/* Binds the listener; NULL when it cannot (quiet: the caller retries, then logs). */
static struct MHD_Daemon *listen_on(struct http *h) {
    char host[64];
    int port;
    bool v6;
    if (!cfg_http_address(h->cfg->http_listen, host, sizeof host, &port, &v6)) return NULL; /* checked by cfg_load */
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port)};
    if (v6) inet_pton(AF_INET6, host, &a6.sin6_addr);
    else inet_pton(AF_INET, host, &a4.sin_addr);
    h->loopback = v6 ? IN6_IS_ADDR_LOOPBACK(&a6.sin6_addr) : (ntohl(a4.sin_addr.s_addr) >> 24) == 127;
    h->port = port;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | (v6 ? MHD_USE_IPv6 : 0);
    /* no SO_REUSEPORT: a second pool given the same address must fail, not share it */
    return MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, handle, h, MHD_OPTION_SOCK_ADDR,
                            v6 ? (struct sockaddr *)&a6 : (struct sockaddr *)&a4, MHD_OPTION_CONNECTION_LIMIT,
                            (unsigned)64, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10, MHD_OPTION_NOTIFY_COMPLETED,
                            request_done, NULL, MHD_OPTION_THREAD_POOL_SIZE, (unsigned)HTTP_THREADS, MHD_OPTION_END);
}

int http_run(const struct cfg *cfg) {
    signal(SIGPIPE, SIG_IGN);
    (void)setpriority(PRIO_PROCESS, 0, 10); /* behind the workers for the CPU; not needed */
    struct http h = {.cfg = cfg, .rollup = rollup_new(cfg)};
    pthread_mutex_init(&h.lock, NULL);
    pthread_mutex_init(&h.req_lock, NULL);
    h.sample = sample_new(cfg);
    /* after a reload the listener of the old generation is still closing (it is
     * retired first): the address is tried again for BIND_WAIT_MS */
    struct MHD_Daemon *d = listen_on(&h);
    for (int64_t until = clock_mono_ms() + BIND_WAIT_MS; !d && !stop_requested && clock_mono_ms() < until;) {
        backoff_sleep(200, &stop_requested);
        d = listen_on(&h);
    }
    if (!d) {
        if (!stop_requested)
            log_error("cannot listen on %s (http.listen): the address is in use or not this host's",
                      cfg->http_listen);
        sample_free(&h.sample);
        rollup_free(h.rollup);
        pthread_mutex_destroy(&h.lock);
        pthread_mutex_destroy(&h.req_lock);
        return stop_requested ? 0 : 1;
    }
    log_info("listening on http://%s (the dashboard at /; /livez, /readyz, /metrics; actions %s)", cfg->http_listen,
             cfg->http_token ? "need the token" : "off: no http.token");
    for (int64_t next_sample = 0, next_brokers = 0, next_parked = 0; !stop_requested;) {
        if (clock_mono_ms() >= next_sample) { /* every SAMPLE_MS: the database, the rollups */
            next_sample = clock_mono_ms() + SAMPLE_MS;
            struct http_sample s = sample_new(cfg);
            s.sampled = true;
            sample_db(&h, &s);
            bool brokers = clock_mono_ms() >= next_brokers;
            if (brokers) {
                next_brokers = clock_mono_ms() + BROKER_SAMPLE_MS;
                sample_brokers(&h, &s);
                count_subscriptions(&h);
            }
            int64_t took = 0;
            bool parked = clock_mono_ms() >= next_parked && sample_parked(&h, &s, &took);
            if (parked) next_parked = clock_mono_ms() + (PARKED_COST * took > PARKED_SAMPLE_MS ? PARKED_COST * took
                                                                                               : PARKED_SAMPLE_MS);
            bool schedules = sample_schedules(&h, &s), limits = sample_limits(&h, &s),
                 producers = sample_producers(&h, &s), subscriptions = sample_subscriptions(&h, &s);
            pthread_mutex_lock(&h.lock);
            struct http_sample old = h.sample;
            s.recent = old.recent;
            if (!brokers) { /* the brokers' part of the last sample stands */
                memcpy(s.broker_used, old.broker_used, sizeof s.broker_used);
                memcpy(s.broker_up, old.broker_up, sizeof s.broker_up);
                memcpy(s.queues, old.queues, (size_t)cfg->nqueues * sizeof *s.queues);
                for (int i = 0; i < cfg->nqueues; i++)
                    if (s.lanes[i]) memcpy(s.lanes[i], old.lanes[i], LANE_CLASSES * (size_t)cfg->queues[i].lanes * sizeof **s.lanes);
            }
            if (!parked) memcpy(s.parked, old.parked, (size_t)cfg->nqueues * sizeof *s.parked);
            for (int i = 0; !parked && i < cfg->nrate_limits; i++) s.limits[i].waiting = old.limits[i].waiting;
            if (!schedules) memcpy(s.schedules, old.schedules, (size_t)cfg->nschedules * sizeof *s.schedules);
            if (!limits) memcpy(s.limits, old.limits, (size_t)cfg->nrate_limits * sizeof *s.limits);
            if (!producers) memcpy(s.producers, old.producers, (size_t)cfg->nproducers * sizeof *s.producers);
            if (!subscriptions) { /* the last rows stand: they move to the new sample */
                s.subscriptions = old.subscriptions;
                s.nsubscriptions = old.nsubscriptions;
                old.subscriptions = NULL;
                old.nsubscriptions = 0;
            }
            h.sample = s;
            pthread_mutex_unlock(&h.lock);
            sample_free(&old);
            rollup_tick(h.rollup, h.db);
        }
        char *recent = sample_recent(&h); /* every RECENT_MS: a command shows on the page within ~1.3 s */
        if (recent) {
            pthread_mutex_lock(&h.lock);
            char *old = h.sample.recent;
            h.sample.recent = recent;
            pthread_mutex_unlock(&h.lock);
            free(old);
        }
        backoff_sleep(RECENT_MS, &stop_requested);
    }
    MHD_stop_daemon(d);
    rollup_flush(h.rollup, h.db);
    rollup_free(h.rollup);
    db_close(h.req_db);
    for (int t = 0; t < 2; t++) broker_close(h.req_broker[t]);
    free(h.sample.recent);
    pthread_mutex_destroy(&h.req_lock);
    db_close(h.db);
    for (int t = 0; t < 2; t++) broker_close(h.broker[t]);
    sample_free(&h.sample);
    pthread_mutex_destroy(&h.lock);
    log_info("http listener stopped");
    return 0;
}
