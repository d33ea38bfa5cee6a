/* reply.c - the HTTP child's answers: every response with the headers it
 * must carry (Content-Security-Policy: the page's own script and style only;
 * nosniff, no-referrer, no-store), as text, JSON, a JSON error, or a 503 whose
 * server text goes to the log under an error id, never to the client.
 */
#include "http.h"

#include <sodium.h>

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The page may load its own script, style and icon and call its own API; every
 * other response (JSON, text, the assets themselves) may load nothing. */
static const char csp_page[] = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
static const char csp_none[] = "default-src 'none'; frame-ancestors 'none'";

/* Queues a response with the headers every response carries, and allow's
 * Allow header when not NULL (a 405). */
static enum MHD_Result respond(struct MHD_Connection *conn, unsigned status, const char *type, const char *body,
                               size_t len, bool must_free, const char *allow) {
    struct MHD_Response *r = MHD_create_response_from_buffer(len, (void *)body,
                                                             must_free ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_MUST_COPY);
    if (!r) {
        if (must_free) free((void *)body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    MHD_add_response_header(r, "Content-Security-Policy", strncmp(type, "text/html", 9) == 0 ? csp_page : csp_none);
    MHD_add_response_header(r, "Referrer-Policy", "no-referrer");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (allow) MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    enum MHD_Result rc = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return rc;
}

enum MHD_Result http_reply(struct MHD_Connection *conn, unsigned status, const char *type, const char *body,
                           size_t len, bool must_free) {
    return respond(conn, status, type, body, len, must_free, NULL);
}

enum MHD_Result http_reply_allow(struct MHD_Connection *conn, unsigned status, const char *type, const char *body,
                                 size_t len, bool must_free, const char *allow) {
    return respond(conn, status, type, body, len, must_free, allow);
}

enum MHD_Result http_text(struct MHD_Connection *conn, unsigned status, const char *body) {
    return http_reply(conn, status, "text/plain; charset=utf-8", body, strlen(body), false);
}

enum MHD_Result http_json(struct MHD_Connection *conn, unsigned status, cJSON *o) {
    char *json = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!json) return http_text(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, "out of memory\n");
    size_t len = strlen(json);
    json = xrealloc(json, len + 2);
    memcpy(json + len, "\n", 2);
    return http_reply(conn, status, "application/json", json, len + 1, true);
}

enum MHD_Result http_error(struct MHD_Connection *conn, unsigned status, const char *fmt, ...) {
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "error", msg);
    return http_json(conn, status, o);
}

enum MHD_Result http_unavailable(struct MHD_Connection *conn, const char *what, const char *detail) {
    unsigned char raw[4];
    char id[2 * sizeof raw + 1];
    randombytes_buf(raw, sizeof raw);
    sodium_bin2hex(id, sizeof id, raw, sizeof raw);
    log_warn("HTTP 503, error %s: %s: %s", id, what, detail && *detail ? detail : "(no detail)");
    char msg[256];
    snprintf(msg, sizeof msg, "%s (error %s in the pool's log)", what, id);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "error", msg);
    cJSON_AddStringToObject(o, "errorId", id);
    return http_json(conn, MHD_HTTP_SERVICE_UNAVAILABLE, o);
}
