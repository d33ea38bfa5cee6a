/* http_action.c - the dashboard's actions: retry and purge dead letters,
 * pause and resume a queue (README, "Dashboard").
 *
 *   POST /api/dead/retry   {"queue": Q, "keys": [K, ...]}
 *   POST /api/dead/purge   {"queue": Q, "keys": [K, ...]}
 *   POST /api/queue/pause  {"queue": Q, "paused": true|false}
 *   POST /api/scheduled/cancel  {"id": UUID}: a parked command cancelled (parked_cancel)
 *   POST /api/schedules/pause   {"name": N, "paused": true|false}
 *
 * Each is checked in this order, and refused with a JSON {"error"} naming why:
 * same origin (Sec-Fetch-Site "same-origin", or an Origin that is this Host;
 * neither: 403), actions enabled (http.token set: else 403), the token
 * (Authorization: Bearer, constant time: 401), Content-Type application/json
 * (415), the body (at most HTTP_BODY_MAX: 413; JSON of that shape: 400), the
 * queue or schedule (404); a cancel of a command that is not parked is a 404
 * that says whether it already ran. A bulk action touches only the keys it names: what the page
 * showed, never what came since. Every action done is logged with its peer.
 */
#include "http.h"

#include <arpa/inet.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define KEYS_MAX 1000 /* keys one request may name */

/* The peer's address, for the log. */
static void peer_of(struct MHD_Connection *conn, char *out, size_t n) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    snprintf(out, n, "?");
    if (!ci || !ci->client_addr) return;
    const struct sockaddr *sa = ci->client_addr;
    if (sa->sa_family == AF_INET) inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, out, (socklen_t)n);
    else if (sa->sa_family == AF_INET6) inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, out, (socklen_t)n);
}

/* NULL when the request comes from the page's own origin, else why not. */
static const char *cross_origin(struct MHD_Connection *conn) {
    const char *site = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Sec-Fetch-Site");
    const char *origin = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Origin");
    const char *host = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_HOST);
    if (site && strcmp(site, "same-origin") != 0) return "refused: Sec-Fetch-Site is not same-origin";
    if (origin) {
        if (!host || strncmp(origin, "http://", 7) != 0 || strcmp(origin + 7, host) != 0)
            return "refused: the Origin is not this dashboard's";
        return NULL;
    }
    return site ? NULL : "refused: an action needs a same-origin Origin or Sec-Fetch-Site header";
}

/* The keys a dead-letter action names, for the walk's selector. */
struct key_set {
    char (*key)[DEAD_KEY_LEN + 1];
    int n;
    bool *seen;          /* key[i] matched a letter */
    struct db *reset_db; /* retry: each chosen letter's attempts reset first */
    int failed;          /* chosen, but its reset failed: left dead */
};

static bool choose_keys(const struct dead_letter *d, int index, void *arg) {
    (void)index;
    struct key_set *ks = arg;
    char key[DEAD_KEY_LEN + 1];
    dead_letter_key(d, key);
    for (int i = 0; i < ks->n; i++) {
        if (strcmp(ks->key[i], key) != 0) continue;
        if (ks->reset_db && dead_letter_reset_attempts(ks->reset_db, d) < 0) {
            log_warn("dashboard: dead letter %s left dead: cannot reset its attempt count: %s", key,
                     db_errstr(ks->reset_db));
            ks->failed++;
            return false;
        }
        ks->seen[i] = true;
        return true;
    }
    return false;
}

static enum MHD_Result dead_action(struct http *h, struct MHD_Connection *conn, const cJSON *body, bool retry,
                                   const struct cfg_queue *q) {
    const cJSON *keys = cJSON_GetObjectItemCaseSensitive(body, "keys");
    int n = cJSON_GetArraySize(keys);
    if (!cJSON_IsArray(keys) || n < 1 || n > KEYS_MAX)
        return http_error(conn, MHD_HTTP_BAD_REQUEST, "keys must be an array of 1 to %d dead-letter keys", KEYS_MAX);
    struct key_set ks = {.key = xcalloc((size_t)n, sizeof *ks.key), .n = n, .seen = xcalloc((size_t)n, sizeof(bool))};
    int k = 0;
    for (const cJSON *x = keys->child; x; x = x->next, k++) {
        if (!cJSON_IsString(x) || strlen(x->valuestring) > DEAD_KEY_LEN || !*x->valuestring) {
            free(ks.key);
            free(ks.seen);
            return http_error(conn, MHD_HTTP_BAD_REQUEST, "keys[%d] is not a dead-letter key", k);
        }
        snprintf(ks.key[k], sizeof ks.key[k], "%s", x->valuestring);
    }
    char err[512];
    enum MHD_Result rc;
    struct broker *b = http_req_broker(h, q->transport, err, sizeof err);
    /* retry: the attempt counts; RabbitMQ: the dead-letter index, whose rows of the taken letters go */
    bool indexed = q->transport == TRANSPORT_RABBITMQ;
    struct db *db = b && (retry || indexed) ? http_req_db(h, err, sizeof err) : NULL;
    if (retry) ks.reset_db = db;
    if (!b || ((retry || indexed) && !db)) {
        rc = http_unavailable(conn, "the broker or the database is unreachable", err);
    } else {
        int count = 0, brc = dead_index_take(b, indexed ? db : NULL, q, choose_keys, &ks, retry, &count);
        int missing = 0;
        for (int i = 0; i < n; i++) missing += !ks.seen[i];
        if (ks.failed) http_req_db_lost(h); /* a reset failed: the next request reconnects */
        char peer[64];
        peer_of(conn, peer, sizeof peer);
        log_info("dashboard (%s): %s %d dead letter%s of %s (%d asked%s%s)", peer, retry ? "requeued" : "purged", count,
                 count == 1 ? "" : "s", q->name, n, brc < 0 ? ", stopped by a broker error" : "",
                 ks.failed ? ", some left dead: their attempt counts could not be reset" : "");
        if (brc < 0) {
            snprintf(err, sizeof err, "%s stopped after %d: %s", retry ? "retry" : "purge", count, broker_error(b));
            http_req_broker_lost(h, q->transport);
            rc = http_unavailable(conn, "the action failed", err);
        } else {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "queue", q->name);
            cJSON_AddNumberToObject(o, "asked", n);
            cJSON_AddNumberToObject(o, retry ? "requeued" : "purged", count);
            cJSON_AddNumberToObject(o, "missing", missing);
            if (ks.failed) cJSON_AddNumberToObject(o, "leftDead", ks.failed); /* their attempt counts could not be reset */
            rc = http_json(conn, MHD_HTTP_OK, o);
        }
    }
    free(ks.key);
    free(ks.seen);
    return rc;
}

/* Pause or resume queue q or, q NULL, the schedule body's "name" names (paused: body's "paused"). */
static enum MHD_Result pause_action(struct http *h, struct MHD_Connection *conn, const cJSON *body,
                                    const struct cfg_queue *q) {
    const cJSON *paused = cJSON_GetObjectItemCaseSensitive(body, "paused");
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(body, "name");
    if (!q && !cJSON_IsString(name)) return http_error(conn, MHD_HTTP_BAD_REQUEST, "name must be a schedule's name");
    if (!cJSON_IsBool(paused)) return http_error(conn, MHD_HTTP_BAD_REQUEST, "paused must be true or false");
    char err[512], peer[64], by[96];
    struct db *db = http_req_db(h, err, sizeof err);
    if (!db) return http_unavailable(conn, "the database is unreachable", err);
    peer_of(conn, peer, sizeof peer);
    snprintf(by, sizeof by, "dashboard@%s", peer);
    bool on = cJSON_IsTrue(paused);
    const char *what = q ? q->name : name->valuestring, *kind = q ? "" : "schedule ";
    int rc = q ? queue_pause_set(db, what, on, by, NULL) : schedule_pause_set(db, h->cfg, what, on, by);
    if (rc == CV_EREJECT) return http_error(conn, MHD_HTTP_NOT_FOUND, "no such schedule in this pool's configuration");
    if (rc < 0) {
        snprintf(err, sizeof err, "cannot %s %s%s: %s", on ? "pause" : "resume", kind, what, db_errstr(db));
        http_req_db_lost(h);
        return http_unavailable(conn, "cannot change the pause", err);
    }
    log_info("dashboard (%s): %s %s%s", peer, on ? "paused" : "resumed", kind, what);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, q ? "queue" : "name", what);
    cJSON_AddBoolToObject(o, "paused", on);
    return http_json(conn, MHD_HTTP_OK, o);
}

static enum MHD_Result cancel_action(struct http *h, struct MHD_Connection *conn, const cJSON *body) {
    const cJSON *arg = cJSON_GetObjectItemCaseSensitive(body, "id");
    char id[ID_LEN + 1], err[512], peer[64];
    if (!cJSON_IsString(arg) || !id_parse(arg->valuestring, id))
        return http_error(conn, MHD_HTTP_BAD_REQUEST, "id must be a command id (a UUID)");
    struct db *db = http_req_db(h, err, sizeof err);
    if (!db) return http_unavailable(conn, "the database is unreachable", err);
    struct parked_cancel c;
    if (parked_cancel(db, h->cfg, id, &c) < 0) {
        snprintf(err, sizeof err, "cannot cancel %s: %s", id, db_errstr(db));
        http_req_db_lost(h);
        return http_unavailable(conn, "cannot cancel the parked command", err);
    }
    if (c.outcome == PARKED_ALREADY_RAN)
        return http_error(conn, MHD_HTTP_NOT_FOUND, "%s already ran (%s at %s): nothing cancelled", id, c.ran_outcome,
                          c.processed_at);
    if (c.outcome == PARKED_NOT_FOUND)
        return http_error(conn, MHD_HTTP_NOT_FOUND, "no parked command with id %s (it may be on its way in a queue)", id);
    peer_of(conn, peer, sizeof peer);
    log_info("dashboard (%s): parked command %s (%s, queue %s) cancelled", peer, id, c.type, c.queue);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", id);
    cJSON_AddStringToObject(o, "outcome", "cancelled");
    cJSON_AddStringToObject(o, "queue", c.queue);
    cJSON_AddStringToObject(o, "type", c.type);
    cJSON_AddStringToObject(o, "eventId", c.event_id);
    return http_json(conn, MHD_HTTP_OK, o);
}

enum MHD_Result http_action(struct http *h, struct MHD_Connection *conn, const char *url, const char *body, size_t len,
                            bool too_big) {
    bool retry = strcmp(url, "/api/dead/retry") == 0, purge = strcmp(url, "/api/dead/purge") == 0;
    bool pause = strcmp(url, "/api/queue/pause") == 0, cancel = strcmp(url, "/api/scheduled/cancel") == 0,
         schedule = strcmp(url, "/api/schedules/pause") == 0;
    if (!retry && !purge && !pause && !cancel && !schedule)
        return http_error(conn, MHD_HTTP_NOT_FOUND, "not found: the actions are /api/dead/retry, /api/dead/purge, "
                                                    "/api/queue/pause, /api/scheduled/cancel and /api/schedules/pause");
    const char *why = cross_origin(conn);
    if (why) return http_error(conn, MHD_HTTP_FORBIDDEN, "%s", why);
    if (!h->cfg->http_token)
        return http_error(conn, MHD_HTTP_FORBIDDEN, "actions are off: set http.token or http.token_file in queues.conf");
    if (!http_has_token(h, conn))
        return http_error(conn, MHD_HTTP_UNAUTHORIZED, "the action needs the token: Authorization: Bearer <http.token>");
    const char *type = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE);
    if (!type || strncasecmp(type, "application/json", 16) != 0 || (type[16] && type[16] != ';' && type[16] != ' '))
        return http_error(conn, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE, "an action's body is JSON: Content-Type: application/json");
    if (too_big) return http_error(conn, MHD_HTTP_CONTENT_TOO_LARGE, "the body is over %d bytes", HTTP_BODY_MAX);
    cJSON *o = len && utf8_valid(body, len) ? cJSON_ParseWithLength(body, len) : NULL;
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return http_error(conn, MHD_HTTP_BAD_REQUEST, "the body must be a JSON object (UTF-8)");
    }
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(o, "queue");
    const struct cfg_queue *q = cJSON_IsString(name) ? cfg_queue_named(h->cfg, name->valuestring) : NULL;
    enum MHD_Result rc;
    if (cancel || schedule) rc = cancel ? cancel_action(h, conn, o) : pause_action(h, conn, o, NULL);
    else if (!cJSON_IsString(name)) rc = http_error(conn, MHD_HTTP_BAD_REQUEST, "queue must be a queue's name");
    else if (!q) rc = http_error(conn, MHD_HTTP_NOT_FOUND, "no such queue in this pool's configuration");
    else rc = pause ? pause_action(h, conn, o, q) : dead_action(h, conn, o, retry, q);
    cJSON_Delete(o);
    return rc;
}
