/* request.c - what a request of the HTTP child works with: the request
 * threads' own database and broker connections (opened on first use, after a
 * failure, and when the server closed an idle one), and the dashboard's token
 * check. The caller holds the listener's req_lock around every use.
 */
#include "http.h"

#include <sodium.h>

#include <stdio.h>
#include <string.h>
#include <strings.h>

struct db *http_req_db(struct http *h, char *err, size_t errlen) {
    if (h->req_db && !db_idle_alive(h->req_db)) {
        log_info("the HTTP listener's database connection was closed by the server; reconnecting");
        http_req_db_lost(h);
    }
    if (h->req_db) return h->req_db;
    int cls;
    char why[512];
    h->req_db = db_connect_class(h->cfg->database_url, &cls, why, sizeof why);
    if (!h->req_db) {
        snprintf(err, errlen, "the database is unreachable: %s", why);
        return NULL;
    }
    (void)db_cmd(h->req_db, "SET statement_timeout TO 5000");
    return h->req_db;
}

void http_req_db_lost(struct http *h) {
    db_close(h->req_db);
    h->req_db = NULL;
}

struct broker *http_req_broker(struct http *h, enum transport t, char *err, size_t errlen) {
    if (h->req_broker[t]) return h->req_broker[t];
    int cls;
    char why[512];
    h->req_broker[t] = broker_open_class(h->cfg, t, &cls, why, sizeof why);
    if (!h->req_broker[t]) snprintf(err, errlen, "%s is unreachable: %s", transport_name(t), why);
    return h->req_broker[t];
}

void http_req_broker_lost(struct http *h, enum transport t) {
    broker_close(h->req_broker[t]);
    h->req_broker[t] = NULL;
}

bool http_has_token(const struct http *h, struct MHD_Connection *conn) {
    const char *token = h->cfg->http_token;
    const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!token || !auth || strncasecmp(auth, "Bearer ", 7) != 0) return false;
    /* both hashed to one length first: the comparison's time tells nothing of either */
    unsigned char want[32], got[32];
    crypto_generichash(want, sizeof want, (const unsigned char *)token, strlen(token), NULL, 0);
    crypto_generichash(got, sizeof got, (const unsigned char *)auth + 7, strlen(auth + 7), NULL, 0);
    return sodium_memcmp(want, got, sizeof want) == 0;
}
