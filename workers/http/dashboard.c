/* dashboard.c - the pool's dashboard: its page (embedded assets) and the
 * reading half of its API, served by the HTTP child (README, "Dashboard").
 *
 *   GET /, /app.js, /app.css, /favicon.svg   the page (workers/http/assets/)
 *   GET /api/overview         queues, workers, relay, outbox, recent commands
 *   GET /api/history?range=hour|day           throughput and latency (rollup.c)
 *   GET /api/dead             dead letters by queue and reason, a page per queue (none taken off
 *                             its queue): [queue=Q] [limit=N, default 200, at most 1000] [cursor=C, with queue]
 *   GET /api/dead/letter?queue=Q&key=K        one, its message's secrets masked
 *   GET /api/command?id=UUID  one command: processed, attempts, events, dead letters
 *   GET /api/limits           the rate limits: tokens now, commands waiting and rejected (sampled)
 *   GET /api/lanes            the queues with lanes: each lane's depth and oldest age (sampled)
 *   GET /api/producers        the producers' outboxes: pending, failed, oldest age (sampled)
 *   GET /api/subscriptions    the durable subscriptions: a JSON array of their registry rows, lag,
 *                             oldest age, gap and dead letters as the pools last counted (sampled)
 *   GET /api/scheduled        parked commands: per queue the count and next due time (sampled),
 *                             and a page of them by due time: [queue=Q] [limit=N, default 20,
 *                             at most 1000] [cursor=C]
 *   GET /api/schedules        every configured schedule and its state
 *
 * The overview reads only the scoreboard and the last sample (no query); the
 * others query through the request thread's own connections. Reading needs
 * the token when http.listen is not a loopback address.
 */
#include "http.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef CONVEYOR_VERSION
#define CONVEYOR_VERSION "unknown"
#endif

#define DEAD_SHOWN_MAX 200

static const struct asset *asset_of(const char *url) {
    for (const struct asset *a = dashboard_assets; a->path; a++)
        if (strcmp(a->path, url) == 0) return a;
    return NULL;
}

bool dashboard_is_asset(const char *url) { return asset_of(url) != NULL; }

static cJSON *overview_workers(const struct scoreboard *sb) {
    cJSON *a = cJSON_CreateArray();
    for (int k = 0; sb && k < sb->nslots; k++) {
        const struct sb_slot *s = &sb->slot[k];
        if (!__atomic_load_n(&s->used, __ATOMIC_ACQUIRE) || s->kind != SB_WORKER) continue;
        int st = __atomic_load_n(&s->state, __ATOMIC_RELAXED);
        if (st == SB_RETIRED) continue;
        pid_t pid = __atomic_load_n(&s->pid, __ATOMIC_RELAXED);
        cJSON *w = cJSON_CreateObject();
        cJSON_AddNumberToObject(w, "slot", k);
        cJSON_AddNumberToObject(w, "pid", pid);
        cJSON_AddStringToObject(w, "queue", s->queue);
        cJSON_AddStringToObject(w, "state", st >= 0 && st < SB_NSTATES ? sb_state_names[st] : "?");
        char id[ID_LEN + 1], type[CFG_NAME_MAX];
        if (st == SB_BUSY && sb_current_read(s, id, type)) {
            cJSON *c = cJSON_AddObjectToObject(w, "current");
            cJSON_AddStringToObject(c, "id", id);
            cJSON_AddStringToObject(c, "type", type);
        } else cJSON_AddNullToObject(w, "current");
        uint64_t done = 0;
        for (int t = 0; t <= s->ntypes && t < SB_TYPES; t++)
            for (int o = 0; o < SB_NOUTCOMES; o++)
                if (o != SB_RETRIED && o != SB_DUPLICATE) /* ended here, by its work */
                    done += __atomic_load_n(&s->counts[t].outcomes[o], __ATOMIC_RELAXED);
        cJSON_AddNumberToObject(w, "done", (double)done);
        long long rss = -1; /* null when it cannot be read */
        if (pid) (void)sb_resident_bytes(pid, &rss);
        json_add_number_or_null(w, "residentBytes", (double)rss);
        cJSON_AddItemToArray(a, w);
    }
    return a;
}

static cJSON *overview_relay(const struct scoreboard *sb) {
    cJSON *r = cJSON_CreateObject();
    cJSON_AddBoolToObject(r, "active", relay_wake_is_local());
    pid_t pid = 0;
    uint64_t published = 0;
    for (int k = 0; sb && k < sb->nslots; k++) {
        const struct sb_slot *s = &sb->slot[k];
        if (!__atomic_load_n(&s->used, __ATOMIC_ACQUIRE) || s->kind != SB_RELAY) continue;
        if (!pid) pid = __atomic_load_n(&s->pid, __ATOMIC_RELAXED);
        for (int t = 0; t <= SB_EVENT_TYPES; t++) published += __atomic_load_n(&s->events[t], __ATOMIC_RELAXED);
    }
    cJSON_AddNumberToObject(r, "pid", pid);
    cJSON_AddNumberToObject(r, "published", (double)published);
    return r;
}

static enum MHD_Result overview(struct http *h, struct MHD_Connection *conn) {
    const struct cfg *cfg = h->cfg;
    const struct scoreboard *sb = scoreboard_get();
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "version", CONVEYOR_VERSION);
    char now[32];
    clock_rfc3339(clock_ms(), now);
    cJSON_AddStringToObject(o, "now", now);
    cJSON *pool = cJSON_AddObjectToObject(o, "pool");
    cJSON_AddNumberToObject(pool, "pid", getppid());
    cJSON_AddBoolToObject(pool, "draining", sb && __atomic_load_n(&sb->draining, __ATOMIC_RELAXED));
    cJSON_AddBoolToObject(cJSON_AddObjectToObject(o, "actions"), "enabled", cfg->http_token != NULL);
    /* the database breaker (breaker.c): "closed", "half-open" or "open", and why */
    char breaker_why[400];
    static const char *const breaker_states[] = {"closed", "half-open", "open"};
    cJSON *breaker = cJSON_AddObjectToObject(o, "breaker");
    cJSON_AddStringToObject(breaker, "state", breaker_states[breaker_read(breaker_why, sizeof breaker_why, NULL)]);
    cJSON_AddStringToObject(breaker, "reason", breaker_why);

    pthread_mutex_lock(&h->lock);
    const struct http_sample *s = &h->sample;
    cJSON *deps = cJSON_AddObjectToObject(o, "dependencies");
    if (s->sampled) cJSON_AddBoolToObject(deps, "postgresql", s->db_up);
    else cJSON_AddNullToObject(deps, "postgresql");
    for (int t = TRANSPORT_RABBITMQ; t <= TRANSPORT_REDIS; t++) {
        if (s->broker_used[t]) cJSON_AddBoolToObject(deps, transport_name((enum transport)t), s->broker_up[t]);
        else cJSON_AddNullToObject(deps, transport_name((enum transport)t));
    }
    cJSON *queues = cJSON_AddArrayToObject(o, "queues");
    for (int i = 0; i < cfg->nqueues; i++) {
        const struct cfg_queue *q = &cfg->queues[i];
        const struct queue_counts *c = i < s->nqueues && s->queues ? &s->queues[i] : NULL;
        struct sb_queue_totals t;
        sb_queue_totals(q, &t);
        struct rollup_live live;
        rollup_live(h->rollup, i, &live);
        cJSON *j = cJSON_CreateObject();
        cJSON_AddStringToObject(j, "name", q->name);
        cJSON_AddStringToObject(j, "transport", transport_name(q->transport));
        cJSON_AddNumberToObject(j, "depth", c ? (double)c->waiting : 0);
        /* the pool's own workers' hands, as the metrics count them; RabbitMQ tells no more */
        cJSON_AddNumberToObject(j, "inFlight", (double)(c && c->in_flight > t.in_hand ? c->in_flight : t.in_hand));
        cJSON_AddNumberToObject(j, "retrying", c ? (double)c->retrying : 0);
        cJSON_AddNumberToObject(j, "dead", c ? (double)c->dead : 0);
        cJSON_AddBoolToObject(j, "paused", queue_paused(q));
        cJSON_AddNumberToObject(j, "ratePerSecond", live.rate);
        json_add_number_or_null(j, "latencyP50Seconds", live.p50);
        json_add_number_or_null(j, "latencyP99Seconds", live.p99);
        cJSON_AddNumberToObject(j, "done", (double)live.done);
        cJSON_AddItemToArray(queues, j);
    }
    cJSON *outbox = cJSON_AddObjectToObject(o, "outbox");
    cJSON_AddNumberToObject(outbox, "pending", (double)s->outbox_pending);
    cJSON_AddNumberToObject(outbox, "oldestAgeSeconds", s->outbox_oldest_s);
    cJSON *recent = s->recent ? cJSON_Parse(s->recent) : NULL;
    pthread_mutex_unlock(&h->lock);
    cJSON_AddItemToObject(o, "recent", recent ? recent : cJSON_CreateArray());
    cJSON_AddItemToObject(o, "workers", overview_workers(sb));
    cJSON_AddItemToObject(o, "relay", overview_relay(sb));
    return http_json(conn, MHD_HTTP_OK, o);
}

static enum MHD_Result history(struct http *h, struct MHD_Connection *conn) {
    const char *range = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "range");
    if (range && strcmp(range, "hour") != 0 && strcmp(range, "day") != 0)
        return http_error(conn, MHD_HTTP_BAD_REQUEST, "range must be hour or day");
    char err[512];
    cJSON *o = NULL;
    for (int tries = 0; tries < 2 && !o; tries++) { /* a connection found broken: once more on a new one */
        struct db *db = http_req_db(h, err, sizeof err);
        if (!db) return http_unavailable(conn, "the database is unreachable", err);
        o = rollup_history(h->rollup, db, range && strcmp(range, "day") == 0, err, sizeof err);
        bool broken = !o && !db_ok(db);
        if (!o) http_req_db_lost(h);
        if (!broken) break;
    }
    if (!o) return http_unavailable(conn, "cannot read the history", err);
    return http_json(conn, MHD_HTTP_OK, o);
}

/* The database for q's dead letters (RabbitMQ: their index), or NULL for Redis;
 * *ok false (with err) when RabbitMQ's cannot be had. */
static struct db *dead_db(struct http *h, const struct cfg_queue *q, bool *ok, char *err, size_t errlen) {
    *ok = true;
    if (q->transport != TRANSPORT_RABBITMQ) return NULL;
    struct db *db = http_req_db(h, err, errlen);
    *ok = db != NULL;
    return db;
}

/* A page of q's dead letters (or, with key or number, the letters that match)
 * into *p through the request thread's connections; 0, or an error class with
 * err (the connections are then closed: the next request reconnects). */
static int read_dead(struct http *h, const struct cfg_queue *q, const char *cursor, int limit, const char *key,
                     struct dead_page *p, char *err, size_t errlen) {
    memset(p, 0, sizeof *p);
    bool ok;
    struct broker *b = http_req_broker(h, q->transport, err, errlen);
    struct db *db = b ? dead_db(h, q, &ok, err, errlen) : NULL;
    if (!b || !ok) return CV_ERETRY;
    int rc = key ? dead_page_find(b, db, q, key, 0, p, err, errlen) : dead_page_read(b, db, q, cursor, limit, p, err, errlen);
    if (rc < 0 && rc != CV_EREJECT) {
        http_req_broker_lost(h, q->transport);
        if (db) http_req_db_lost(h);
    }
    return rc;
}

static enum MHD_Result dead(struct http *h, struct MHD_Connection *conn) {
    const char *only = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "queue");
    const char *cursor = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "cursor");
    const char *lim = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "limit");
    const struct cfg_queue *oq = only ? cfg_queue_named(h->cfg, only) : NULL;
    if (only && !oq) return http_error(conn, MHD_HTTP_NOT_FOUND, "no such queue: give queue=NAME of this pool's configuration");
    if (cursor && !oq) return http_error(conn, MHD_HTTP_BAD_REQUEST, "cursor=C needs the queue=Q it came from");
    int limit = DEAD_SHOWN_MAX;
    if (lim) {
        char *end;
        long v = strtol(lim, &end, 10);
        if (*end || v < 1 || v > DEAD_PAGE_MAX)
            return http_error(conn, MHD_HTTP_BAD_REQUEST, "limit must be 1 to %d", DEAD_PAGE_MAX);
        limit = (int)v;
    }
    cJSON *o = cJSON_CreateObject(), *queues = cJSON_AddArrayToObject(o, "queues");
    for (int i = 0; i < h->cfg->nqueues; i++) {
        const struct cfg_queue *q = &h->cfg->queues[i];
        if (oq && q != oq) continue;
        struct dead_page p;
        char err[600];
        int rc = read_dead(h, q, cursor, limit, NULL, &p, err, sizeof err);
        if (rc < 0) {
            cJSON_Delete(o);
            if (rc == CV_EREJECT) return http_error(conn, MHD_HTTP_BAD_REQUEST, "%s", err);
            return http_unavailable(conn, "cannot read the dead letters", err);
        }
        cJSON *j = cJSON_CreateObject(), *groups = cJSON_CreateArray();
        cJSON_AddStringToObject(j, "queue", q->name);
        cJSON_AddStringToObject(j, "transport", transport_name(q->transport));
        cJSON_AddNumberToObject(j, "total", (double)p.total);
        cJSON_AddNumberToObject(j, "shown", p.n);
        cJSON_AddNumberToObject(j, "offset", (double)p.offset);
        cJSON_AddNumberToObject(j, "limit", limit);
        if (p.next[0]) cJSON_AddStringToObject(j, "nextCursor", p.next);
        else cJSON_AddNullToObject(j, "nextCursor");
        for (int k = 0; k < p.n; k++) {
            const char *reason = p.d[k].reason ? p.d[k].reason : "?";
            cJSON *g = NULL;
            for (cJSON *x = groups->child; x && !g; x = x->next)
                if (strcmp(cJSON_GetObjectItem(x, "reason")->valuestring, reason) == 0) g = x;
            if (!g) {
                g = cJSON_CreateObject();
                cJSON_AddStringToObject(g, "reason", reason);
                cJSON_AddNumberToObject(g, "count", 0);
                cJSON_AddArrayToObject(g, "letters");
                cJSON_AddItemToArray(groups, g);
            }
            cJSON *count = cJSON_GetObjectItem(g, "count");
            cJSON_SetNumberValue(count, count->valuedouble + 1);
            cJSON *letter = dead_letter_json(q, &p.d[k], (int)p.number[k], false);
            cJSON_DeleteItemFromObject(letter, "queue");
            cJSON_DeleteItemFromObject(letter, "reason");
            cJSON_AddItemToArray(cJSON_GetObjectItem(g, "letters"), letter);
        }
        cJSON_AddItemToObject(j, "groups", groups);
        cJSON_AddItemToArray(queues, j);
        dead_page_free(&p);
    }
    return http_json(conn, MHD_HTTP_OK, o);
}

static enum MHD_Result dead_letter(struct http *h, struct MHD_Connection *conn) {
    const char *name = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "queue");
    const char *key = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "key");
    const struct cfg_queue *q = name ? cfg_queue_named(h->cfg, name) : NULL;
    if (!q) return http_error(conn, MHD_HTTP_NOT_FOUND, "no such queue: give queue=NAME of this pool's configuration");
    if (!key || !*key) return http_error(conn, MHD_HTTP_BAD_REQUEST, "give key=KEY (a dead letter's key)");
    struct dead_page p;
    char err[600];
    if (read_dead(h, q, NULL, 0, key, &p, err, sizeof err) < 0) return http_unavailable(conn, "cannot read the dead letters", err);
    cJSON *found = NULL;
    for (int k = 0; k < p.n && !found; k++) {
        char kk[DEAD_KEY_LEN + 1];
        dead_letter_key(&p.d[k], kk);
        if (strcmp(kk, key) == 0) found = dead_letter_json(q, &p.d[k], (int)p.number[k], true);
    }
    dead_page_free(&p);
    if (!found) return http_error(conn, MHD_HTTP_NOT_FOUND, "no dead letter with that key in %s (retried or purged?)", q->name);
    return http_json(conn, MHD_HTTP_OK, found);
}

/* Adds column c of row 0 of r to o as key: a string, or null when NULL. */
static void add_text(cJSON *o, const char *key, const PGresult *r, int row, int c) {
    if (PQgetisnull(r, row, c)) cJSON_AddNullToObject(o, key);
    else cJSON_AddStringToObject(o, key, PQgetvalue(r, row, c));
}

static enum MHD_Result command(struct http *h, struct MHD_Connection *conn) {
    const char *arg = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "id");
    char id[ID_LEN + 1];
    if (!arg || !id_parse(arg, id)) return http_error(conn, MHD_HTTP_BAD_REQUEST, "id must be a command id (a UUID)");
    char err[512];
    struct db *db = http_req_db(h, err, sizeof err);
    if (!db) return http_unavailable(conn, "the database is unreachable", err);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", id);
    const char *p[1] = {id};
    PGresult *r = NULL;
    int rc = db_exec(db, "SELECT type, outcome, " SQL_RFC3339("processed_at") " FROM processed_commands WHERE id = $1",
                     1, p, &r);
    if (rc == 0) {
        if (PQntuples(r)) {
            cJSON *pr = cJSON_AddObjectToObject(o, "processed");
            add_text(pr, "type", r, 0, 0);
            add_text(pr, "outcome", r, 0, 1);
            add_text(pr, "processedAt", r, 0, 2);
        } else cJSON_AddNullToObject(o, "processed");
        PQclear(r);
        rc = db_exec(db, "SELECT attempts, last_error, " SQL_RFC3339("updated_at") " FROM command_attempts WHERE id = $1",
                     1, p, &r);
    }
    if (rc == 0) {
        if (PQntuples(r)) {
            cJSON *a = cJSON_AddObjectToObject(o, "attempts");
            cJSON_AddNumberToObject(a, "count", atoi(PQgetvalue(r, 0, 0)));
            add_text(a, "lastError", r, 0, 1);
            add_text(a, "updatedAt", r, 0, 2);
        } else cJSON_AddNullToObject(o, "attempts");
        PQclear(r);
        /* its events share its transaction's now(): created_at = processed_at, by
         * the BRIN index of sql/0006 (none when it was never processed) */
        rc = db_exec(db, "SELECT o.event_id, o.event_type, o.payload->>'occurredAt', "
                         SQL_RFC3339("o.published_at") ", o.payload::text FROM processed_commands p "
                         "JOIN outbox o ON o.created_at = p.processed_at AND o.payload->>'commandId' = p.id::text "
                         "WHERE p.id = $1 ORDER BY o.id", 1, p, &r);
    }
    if (rc < 0) {
        snprintf(err, sizeof err, "cannot read the command: %s", db_errstr(db));
        http_req_db_lost(h);
        cJSON_Delete(o);
        return http_unavailable(conn, "cannot read the command", err);
    }
    cJSON *events = cJSON_AddArrayToObject(o, "events");
    for (int i = 0; i < PQntuples(r); i++) {
        cJSON *e = cJSON_CreateObject();
        add_text(e, "id", r, i, 0);
        add_text(e, "type", r, i, 1);
        add_text(e, "occurredAt", r, i, 2);
        add_text(e, "publishedAt", r, i, 3);
        cJSON *payload = cJSON_Parse(PQgetvalue(r, i, 4));
        cJSON_AddItemToObject(e, "payload", payload ? payload : cJSON_CreateNull());
        cJSON_AddItemToArray(events, e);
    }
    PQclear(r);
    cJSON *deads = cJSON_AddArrayToObject(o, "deadLetters");
    for (int i = 0; i < h->cfg->nqueues; i++) {
        const struct cfg_queue *q = &h->cfg->queues[i];
        struct dead_page page; /* its key is its id: found by key, none taken off its queue */
        char derr[600];
        if (read_dead(h, q, NULL, 0, id, &page, derr, sizeof derr) < 0) {
            cJSON_Delete(o);
            return http_unavailable(conn, "cannot read the dead letters", derr);
        }
        for (int k = 0; k < page.n; k++) {
            char cid[ID_LEN + 1];
            dead_letter_command_id(&page.d[k], cid);
            if (strcmp(cid, id) == 0) cJSON_AddItemToArray(deads, dead_letter_json(q, &page.d[k], (int)page.number[k], true));
        }
        dead_page_free(&page);
    }
    cJSON_AddStringToObject(o, "envelopeNote",
                            "The envelope of an applied or rejected command is not kept; its events show what it did. "
                            "A dead letter keeps its message (shown here with password fields masked).");
    return http_json(conn, MHD_HTTP_OK, o);
}

#define PARKED_SHOWN 20

static enum MHD_Result scheduled(struct http *h, struct MHD_Connection *conn) {
    const char *only = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "queue");
    const char *cursor = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "cursor");
    const char *lim = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "limit");
    if (only && !cfg_queue_named(h->cfg, only))
        return http_error(conn, MHD_HTTP_NOT_FOUND, "no such queue: give queue=NAME of this pool's configuration");
    char *end = NULL;
    long limit = lim ? strtol(lim, &end, 10) : PARKED_SHOWN;
    if (lim && (*end || limit < 1 || limit > PARKED_PAGE_MAX))
        return http_error(conn, MHD_HTTP_BAD_REQUEST, "limit must be 1 to %d", PARKED_PAGE_MAX);
    char err[512];
    struct db *db = http_req_db(h, err, sizeof err);
    if (!db) return http_unavailable(conn, "the database is unreachable", err);
    struct parked_page p;
    int rc = parked_page_read(db, only, cursor, (int)limit, &p, err, sizeof err);
    if (rc == CV_EREJECT) return http_error(conn, MHD_HTTP_BAD_REQUEST, "%s", err);
    if (rc < 0) {
        http_req_db_lost(h);
        return http_unavailable(conn, "cannot read the parked commands", err);
    }
    cJSON *o = cJSON_CreateObject(), *queues = cJSON_AddArrayToObject(o, "queues");
    pthread_mutex_lock(&h->lock); /* the counts: the last sample's (a count walks every parked row) */
    for (int i = 0; i < h->cfg->nqueues; i++) {
        const struct parked_queue_stat *st = h->sample.parked ? &h->sample.parked[i] : NULL;
        if (only && strcmp(only, h->cfg->queues[i].name) != 0) continue;
        cJSON *q = cJSON_CreateObject();
        cJSON_AddStringToObject(q, "queue", h->cfg->queues[i].name);
        cJSON_AddNumberToObject(q, "parked", st ? (double)st->count : 0);
        json_add_optional(q, "nextDueAt", st && st->next_due[0] ? st->next_due : NULL);
        cJSON_AddItemToArray(queues, q);
    }
    pthread_mutex_unlock(&h->lock);
    cJSON *rows = cJSON_AddArrayToObject(o, "rows");
    for (int i = 0; i < p.n; i++) cJSON_AddItemToArray(rows, parked_row_json(&p.rows[i]));
    cJSON_AddNumberToObject(o, "limit", (double)limit);
    json_add_optional(o, "nextCursor", p.next[0] ? p.next : NULL);
    parked_page_free(&p);
    return http_json(conn, MHD_HTTP_OK, o);
}

static enum MHD_Result schedules(struct http *h, struct MHD_Connection *conn) {
    char err[512];
    struct db *db = http_req_db(h, err, sizeof err);
    if (!db) return http_unavailable(conn, "the database is unreachable", err);
    struct schedule_state *st = xcalloc((size_t)h->cfg->nschedules + 1, sizeof *st);
    if (schedule_states_read(db, h->cfg, st) < 0) {
        snprintf(err, sizeof err, "%s", db_errstr(db));
        free(st);
        http_req_db_lost(h);
        return http_unavailable(conn, "cannot read the schedules", err);
    }
    cJSON *o = cJSON_CreateObject(), *a = cJSON_AddArrayToObject(o, "schedules");
    for (int i = 0; i < h->cfg->nschedules; i++) cJSON_AddItemToArray(a, schedule_state_json(&st[i]));
    free(st);
    return http_json(conn, MHD_HTTP_OK, o);
}

/* GET /api/limits: every rate limit (rate_limit_state_json) from the last sample. */
static enum MHD_Result limits(struct http *h, struct MHD_Connection *conn) {
    cJSON *o = cJSON_CreateObject(), *a = cJSON_AddArrayToObject(o, "limits");
    pthread_mutex_lock(&h->lock);
    for (int i = 0; i < h->sample.nrate_limits; i++) cJSON_AddItemToArray(a, rate_limit_state_json(&h->sample.limits[i]));
    pthread_mutex_unlock(&h->lock);
    return http_json(conn, MHD_HTTP_OK, o);
}

/* GET /api/lanes: the lanes of every queue that has them (lane_queue_json), from the last sample. */
static enum MHD_Result lanes(struct http *h, struct MHD_Connection *conn) {
    cJSON *o = cJSON_CreateObject(), *a = cJSON_AddArrayToObject(o, "queues");
    pthread_mutex_lock(&h->lock);
    for (int i = 0; i < h->sample.nqueues && h->sample.lanes; i++)
        if (h->sample.lanes[i]) cJSON_AddItemToArray(a, lane_queue_json(&h->cfg->queues[i], h->sample.lanes[i]));
    pthread_mutex_unlock(&h->lock);
    return http_json(conn, MHD_HTTP_OK, o);
}

/* GET /api/producers: every producer's outbox (forward_state_json), from the last sample. */
static enum MHD_Result producers(struct http *h, struct MHD_Connection *conn) {
    cJSON *o = cJSON_CreateObject(), *a = cJSON_AddArrayToObject(o, "producers");
    pthread_mutex_lock(&h->lock);
    for (int i = 0; i < h->sample.nproducers; i++) cJSON_AddItemToArray(a, forward_state_json(&h->sample.producers[i]));
    pthread_mutex_unlock(&h->lock);
    return http_json(conn, MHD_HTTP_OK, o);
}

/* GET /api/subscriptions: the durable subscriptions' registry rows
 * (subscription_row_json: the pools' last counts), from the last sample; a
 * JSON array. */
static enum MHD_Result subscriptions(struct http *h, struct MHD_Connection *conn) {
    cJSON *a = cJSON_CreateArray();
    pthread_mutex_lock(&h->lock);
    for (int i = 0; i < h->sample.nsubscriptions; i++)
        cJSON_AddItemToArray(a, subscription_row_json(&h->sample.subscriptions[i]));
    pthread_mutex_unlock(&h->lock);
    return http_json(conn, MHD_HTTP_OK, a);
}

enum MHD_Result dashboard_get(struct http *h, struct MHD_Connection *conn, const char *url) {
    const struct asset *a = asset_of(url);
    if (a) return http_reply(conn, MHD_HTTP_OK, a->type, (const char *)a->data, a->len, false);
    if (!h->loopback && !http_has_token(h, conn))
        return http_error(conn, h->cfg->http_token ? MHD_HTTP_UNAUTHORIZED : MHD_HTTP_FORBIDDEN,
                          h->cfg->http_token ? "reading the API on a non-loopback address needs the token "
                                               "(Authorization: Bearer)"
                                             : "the API on a non-loopback address needs http.token or http.token_file");
    if (strcmp(url, "/api/overview") == 0) return overview(h, conn);
    if (strcmp(url, "/api/history") == 0) return history(h, conn);
    if (strcmp(url, "/api/dead") == 0) return dead(h, conn);
    if (strcmp(url, "/api/dead/letter") == 0) return dead_letter(h, conn);
    if (strcmp(url, "/api/command") == 0) return command(h, conn);
    if (strcmp(url, "/api/scheduled") == 0) return scheduled(h, conn);
    if (strcmp(url, "/api/schedules") == 0) return schedules(h, conn);
    if (strcmp(url, "/api/limits") == 0) return limits(h, conn);
    if (strcmp(url, "/api/lanes") == 0) return lanes(h, conn);
    if (strcmp(url, "/api/producers") == 0) return producers(h, conn);
    if (strcmp(url, "/api/subscriptions") == 0) return subscriptions(h, conn);
    return http_error(conn, MHD_HTTP_NOT_FOUND, "not found: see the README, \"Dashboard\", for the API's paths");
}
