/* url.c - connection URLs: their syntax checked before any connection is
 * tried, Redis URLs parsed, and passwords kept out of every message. */
#include "core.h"

#include <amqp.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MASK "***"

/* Appends len bytes of s to out (capacity n, *at bytes used), truncating. */
static void put(char *out, size_t n, size_t *at, const char *s, size_t len) {
    if (*at + 1 >= n) return;
    if (len > n - 1 - *at) len = n - 1 - *at;
    memcpy(out + *at, s, len);
    *at += len;
    out[*at] = '\0';
}

/* The end of the user:password part of "scheme://...": the last '@' (a raw
 * '@', ':' or '/' in a password must not let any of it through, so a URL
 * that is ambiguous is masked too much, never too little), or NULL. */
static const char *userinfo_end(const char *authority) {
    return strrchr(authority, '@');
}

/* True for a redis:// or redis-sentinel:// URL, whose userinfo without ':' is a
 * password (AUTH), not a user. */
static bool is_redis(const char *url) {
    return strncmp(url, "redis://", 8) == 0 || strncmp(url, SENTINEL_SCHEME, strlen(SENTINEL_SCHEME)) == 0;
}

/* The separator of a list of RabbitMQ URLs at p: a comma followed by optional
 * spaces and "amqp://" or "amqps://" (a comma elsewhere, in a password say, is
 * part of its URL). Returns the length of the separator (up to the scheme), or 0. */
static size_t list_separator(const char *p) {
    if (*p != ',') return 0;
    size_t k = 1;
    while (p[k] == ' ' || p[k] == '\t') k++;
    return strncmp(p + k, "amqp://", 7) == 0 || strncmp(p + k, "amqps://", 8) == 0 ? k : 0;
}

/* True when url is a list of RabbitMQ URLs (url_list_count > 1). */
static bool is_amqp_list(const char *url) {
    return url && strncmp(url, "amqp", 4) == 0 && url_list_count(url) > 1;
}

int url_list_count(const char *list) {
    int n = 1;
    for (const char *p = list; *p; p++) n += list_separator(p) > 0;
    return n;
}

bool url_list_item(const char *list, int i, char *out, size_t n) {
    if (n) out[0] = '\0';
    const char *p = list;
    for (int k = 0; k < i; k++) {
        size_t sep = 0;
        while (*p && !(sep = list_separator(p))) p++;
        if (!*p) return false;
        p += sep;
    }
    while (*p == ' ' || *p == '\t') p++;
    size_t len = 0;
    while (p[len] && !list_separator(p + len)) len++;
    while (len && (p[len - 1] == ' ' || p[len - 1] == '\t')) len--;
    if (len + 1 > n) return false;
    memcpy(out, p, len);
    out[len] = '\0';
    return true;
}

/* True at the start of a "password" (or libpq's "sslpassword", the client
 * key's passphrase) key in a libpq key=value string or a URL query: *value
 * then points at its value. */
static bool password_key(const char *p, const char *start, bool query, const char **value) {
    size_t len = strncasecmp(p, "password", 8) == 0 ? 8 : strncasecmp(p, "sslpassword", 11) == 0 ? 11 : 0;
    if (!len) return false;
    if (p > start && (query ? (p[-1] != '?' && p[-1] != '&') : !isspace((unsigned char)p[-1]))) return false;
    const char *q = p + len;
    if (!query) while (isspace((unsigned char)*q)) q++;
    if (*q != '=') return false;
    q++;
    if (!query) while (isspace((unsigned char)*q)) q++;
    *value = q;
    return true;
}

/* The end of a value that starts at v: in a query up to '&' or '#'; in a
 * key=value string a quoted value (with backslash escapes) or up to a space. */
static const char *value_end(const char *v, bool query) {
    if (query) return v + strcspn(v, "&#");
    if (*v == '\'') {
        for (v++; *v && *v != '\''; v++)
            if (*v == '\\' && v[1]) v++;
        return *v ? v + 1 : v;
    }
    while (*v && !isspace((unsigned char)*v)) v++;
    return v;
}

void url_redact(const char *url, char *out, size_t n) {
    if (!n) return;
    out[0] = '\0';
    if (!url) return;
    size_t at = 0;
    if (is_amqp_list(url)) { /* each URL of the list on its own, joined by ", " */
        char item[1024], shown[1024];
        for (int i = 0, k = url_list_count(url); i < k; i++) {
            if (!url_list_item(url, i, item, sizeof item)) snprintf(item, sizeof item, "amqp://***");
            url_redact(item, shown, sizeof shown);
            if (i) put(out, n, &at, ", ", 2);
            put(out, n, &at, shown, strlen(shown));
        }
        return;
    }
    const char *p = url, *scheme_end = strstr(url, "://");
    bool query = scheme_end != NULL;
    if (!scheme_end && !strchr(url, '=') && strpbrk(url, ":@")) {
        /* neither a URL nor key=value ("user:secret@host/db" without its scheme): any part may be a password */
        put(out, n, &at, MASK, strlen(MASK));
        return;
    }
    if (scheme_end) {
        const char *auth = scheme_end + 3, *end = userinfo_end(auth);
        const char *colon = end ? memchr(auth, ':', (size_t)(end - auth)) : NULL;
        if (!colon && end && is_redis(url)) colon = auth - 1; /* redis://secret@host: all of it is the password */
        if (colon) {
            put(out, n, &at, url, (size_t)(colon + 1 - url));
            put(out, n, &at, MASK, strlen(MASK));
            p = end;
        }
    }
    /* the rest, with any password= value masked */
    const char *start = query ? strchr(p, '?') : p;
    if (!start) {
        put(out, n, &at, p, strlen(p));
        return;
    }
    const char *s = start;
    while (*s) {
        const char *v;
        if (password_key(s, start, query, &v)) {
            put(out, n, &at, p, (size_t)(v - p));
            put(out, n, &at, MASK, strlen(MASK));
            p = s = value_end(v, query);
            continue;
        }
        s++;
    }
    put(out, n, &at, p, strlen(p));
}

/* Decodes %XX escapes of len bytes of s into out (n bytes). */
static void percent_decode(const char *s, size_t len, char *out, size_t n) {
    size_t o = 0;
    for (size_t i = 0; i < len && o + 1 < n; i++) {
        if (s[i] == '%' && i + 2 < len && isxdigit((unsigned char)s[i + 1]) && isxdigit((unsigned char)s[i + 2])) {
            char hex[3] = {s[i + 1], s[i + 2], 0};
            out[o++] = (char)strtol(hex, NULL, 16);
            i += 2;
        } else {
            out[o++] = s[i];
        }
    }
    out[o] = '\0';
}

/* Copies text to out with every occurrence of secret (if not empty) replaced by ***. */
static void mask_in(const char *text, const char *secret, char *out, size_t n) {
    size_t at = 0, len = strlen(secret);
    out[0] = '\0';
    const char *p = text, *hit;
    while (len && (hit = strstr(p, secret))) {
        put(out, n, &at, p, (size_t)(hit - p));
        put(out, n, &at, MASK, strlen(MASK));
        p = hit + len;
    }
    put(out, n, &at, p, strlen(p));
}

void url_scrub(const char *text, const char *url, char *out, size_t n) {
    if (!n) return;
    if (is_amqp_list(url)) { /* the secrets of each URL of the list, one after the other */
        char item[1024], work[2][1024];
        int cur = 0;
        snprintf(work[0], sizeof work[0], "%s", text ? text : "");
        for (int i = 0, k = url_list_count(url); i < k; i++) {
            if (!url_list_item(url, i, item, sizeof item)) { /* cannot be scrubbed: not shown at all */
                snprintf(out, n, "(the error text is hidden: URL %d of the list is too long to mask)", i + 1);
                return;
            }
            url_scrub(work[cur], item, work[!cur], sizeof work[0]);
            cur = !cur;
        }
        snprintf(out, n, "%s", work[cur]);
        return;
    }
    char work[2][1024];
    snprintf(work[0], sizeof work[0], "%s", text ? text : "");
    int cur = 0;
    /* every password the URL holds: user:password@, and password= values */
    const char *secrets[8][2];
    int k = 0;
    const char *scheme_end = url ? strstr(url, "://") : NULL;
    if (scheme_end) {
        const char *auth = scheme_end + 3, *end = userinfo_end(auth);
        const char *colon = end ? memchr(auth, ':', (size_t)(end - auth)) : NULL;
        if (!colon && end && is_redis(url)) colon = auth - 1; /* redis://secret@host */
        if (colon) secrets[k][0] = colon + 1, secrets[k++][1] = end;
    }
    const char *start = !url ? NULL : scheme_end ? strchr(scheme_end, '?') : url;
    for (const char *s = start; s && *s && k < 8; s++) {
        const char *v;
        if (password_key(s, start, scheme_end != NULL, &v)) {
            const char *e = value_end(v, scheme_end != NULL);
            if (!scheme_end && *v == '\'' && e > v + 1) secrets[k][0] = v + 1, secrets[k++][1] = e - 1;
            else secrets[k][0] = v, secrets[k++][1] = e;
        }
    }
    for (int i = 0; i < k; i++) {
        char raw[512], decoded[512];
        size_t len = (size_t)(secrets[i][1] - secrets[i][0]);
        snprintf(raw, sizeof raw, "%.*s", (int)len, secrets[i][0]);
        percent_decode(secrets[i][0], len, decoded, sizeof decoded);
        mask_in(work[cur], raw, work[!cur], sizeof work[0]);
        cur = !cur;
        mask_in(work[cur], decoded, work[!cur], sizeof work[0]);
        cur = !cur;
    }
    snprintf(out, n, "%s", work[cur]);
}

/* True when s is a port number 1-65535 (len bytes, digits only). */
static bool valid_port(const char *s, size_t len) {
    if (len == 0 || len > 5) return false;
    long v = 0;
    for (size_t i = 0; i < len; i++) {
        if (!isdigit((unsigned char)s[i])) return false;
        v = v * 10 + (s[i] - '0');
    }
    return v >= 1 && v <= 65535;
}

/* Parses "host[:port]" of len bytes at p into host (n bytes) and *port (deflt when
 * absent). Returns 0, or CV_ECONFIG with the reason in why. */
static int parse_host_port(const char *p, size_t len, int deflt, char *host, size_t hn, int *port, char *why,
                           size_t n) {
    const char *colon = memchr(p, ':', len);
    if (len && p[0] == '[') { /* [IPv6 address][:port] */
        const char *close = memchr(p, ']', len);
        if (!close || (close + 1 < p + len && close[1] != ':')) {
            snprintf(why, n, "an IPv6 address is written [address]:port");
            return CV_ECONFIG;
        }
        p++;
        len--;
        colon = close + 1 < p + len ? close + 1 : NULL;
        if ((size_t)(close - p) >= hn) {
            snprintf(why, n, "a host name is too long");
            return CV_ECONFIG;
        }
        snprintf(host, hn, "%.*s", (int)(close - p), p);
        *port = deflt;
        if (colon && !valid_port(colon + 1, (size_t)(p + len - colon - 1))) {
            snprintf(why, n, "the port must be a number from 1 to 65535");
            return CV_ECONFIG;
        }
        if (colon) *port = atoi(colon + 1);
        return 0;
    }
    size_t hlen = colon ? (size_t)(colon - p) : len;
    if (hlen >= hn) {
        snprintf(why, n, "a host name is too long");
        return CV_ECONFIG;
    }
    snprintf(host, hn, "%.*s", (int)hlen, p);
    *port = deflt;
    if (colon) {
        size_t plen = len - hlen - 1;
        if (!valid_port(colon + 1, plen)) {
            snprintf(why, n, "the port must be a number from 1 to 65535");
            return CV_ECONFIG;
        }
        *port = atoi(colon + 1);
    }
    return 0;
}

/* "/db" (digits only) at p, into *db. Returns 0, or CV_ECONFIG. */
static int parse_db(const char *p, int *db, char *why, size_t n) {
    size_t digits = strspn(p, "0123456789");
    long v = digits <= 6 ? strtol(p, NULL, 10) : 100001;
    if (!digits || p[digits] || v > 100000) { /* digits only, no sign or space */
        snprintf(why, n, "the database must be a number (redis://host:port/0)");
        return CV_ECONFIG;
    }
    *db = (int)v;
    return 0;
}

int url_parse_redis(const char *url, struct redis_url *out, char *why, size_t n) {
    memset(out, 0, sizeof *out);
    bool sentinel = strncmp(url, SENTINEL_SCHEME, strlen(SENTINEL_SCHEME)) == 0;
    if (!sentinel && strncmp(url, "redis://", 8) != 0) {
        const char *e = strstr(url, "://");
        if (e) snprintf(why, n, "unknown scheme '%.*s' (want redis:// or " SENTINEL_SCHEME ")",
                        (int)(e - url) > 32 ? 32 : (int)(e - url), url);
        else snprintf(why, n, "not a URL (want redis://[[user]:password@]host[:port][/db])");
        return CV_ECONFIG;
    }
    const char *p = url + (sentinel ? strlen(SENTINEL_SCHEME) : 8), *at = userinfo_end(p);
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon) snprintf(out->user, sizeof out->user, "%.*s", (int)(colon - p), p);
        const char *pw = colon ? colon + 1 : p;
        if ((size_t)(at - pw) >= sizeof out->password) {
            snprintf(why, n, "the password is too long");
            return CV_ECONFIG;
        }
        snprintf(out->password, sizeof out->password, "%.*s", (int)(at - pw), pw);
        p = at + 1;
    }
    const char *slash = strchr(p, '/');
    const char *hend = slash ? slash : p + strlen(p);
    if (!sentinel) {
        if (parse_host_port(p, (size_t)(hend - p), 6379, out->host, sizeof out->host, &out->port, why, n) < 0)
            return CV_ECONFIG;
        if (!out->host[0]) snprintf(out->host, sizeof out->host, "127.0.0.1");
        return slash && slash[1] ? parse_db(slash + 1, &out->db, why, n) : 0;
    }
    /* redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db] */
    for (const char *h = p;;) { /* each host[:port] up to a ',', or the '/' */
        const char *e = memchr(h, ',', (size_t)(hend - h));
        if (!e) e = hend;
        if (out->nsentinels == REDIS_SENTINELS_MAX) {
            snprintf(why, n, "more than %d Sentinels", REDIS_SENTINELS_MAX);
            return CV_ECONFIG;
        }
        struct redis_sentinel *s = &out->sentinels[out->nsentinels++];
        if (parse_host_port(h, (size_t)(e - h), 26379, s->host, sizeof s->host, &s->port, why, n) < 0)
            return CV_ECONFIG;
        if (!s->host[0]) {
            snprintf(why, n, "a Sentinel's host is empty");
            return CV_ECONFIG;
        }
        if (e == hend) break;
        h = e + 1;
    }
    const char *m = slash ? slash + 1 : "", *mend = m + strcspn(m, "/");
    if (!out->nsentinels || mend == m) {
        snprintf(why, n, "want " SENTINEL_SCHEME "[:password@]host[:port][,host[:port]...]/master[/db]");
        return CV_ECONFIG;
    }
    if ((size_t)(mend - m) >= sizeof out->master) {
        snprintf(why, n, "the master name is too long");
        return CV_ECONFIG;
    }
    snprintf(out->master, sizeof out->master, "%.*s", (int)(mend - m), m);
    return *mend && mend[1] ? parse_db(mend + 1, &out->db, why, n) : 0;
}

/* libpq: a postgresql:// or postgres:// URL, or a key=value string. */
static int check_postgres(const char *url, char *why, size_t n) {
    const char *e = strstr(url, "://");
    if (e && strncmp(url, "postgresql://", 13) != 0 && strncmp(url, "postgres://", 11) != 0) {
        snprintf(why, n, "unknown scheme '%.*s' (want postgresql://, postgres:// or libpq key=value)",
                 (int)(e - url) > 32 ? 32 : (int)(e - url), url);
        return CV_ECONFIG;
    }
    if (!e && !strchr(url, '=')) {
        snprintf(why, n, "not a URL (want postgresql://user:password@host:port/database or libpq key=value)");
        return CV_ECONFIG;
    }
    char *msg = NULL;
    PQconninfoOption *opts = PQconninfoParse(url, &msg);
    if (!opts) {
        char text[512];
        snprintf(text, sizeof text, "%s", msg ? msg : "out of memory");
        for (size_t k = strlen(text); k && (text[k - 1] == '\n' || text[k - 1] == ' ');) text[--k] = '\0';
        url_scrub(text, url, why, n);
        PQfreemem(msg);
        return CV_ECONFIG;
    }
    int rc = 0;
    for (PQconninfoOption *o = opts; o->keyword && rc == 0; o++) {
        if (strcmp(o->keyword, "port") != 0 || !o->val || !*o->val) continue;
        for (const char *p = o->val; rc == 0;) { /* a list, one per host */
            size_t len = strcspn(p, ",");
            if (len > 0 && !valid_port(p, len)) {
                snprintf(why, n, "the port must be a number from 1 to 65535");
                rc = CV_ECONFIG;
            }
            if (!p[len]) break;
            p += len + 1;
        }
    }
    PQconninfoFree(opts);
    return rc;
}

/* librabbitmq: amqp://user:password@host:port/vhost, or amqps:// (TLS). */
static int check_amqp_one(const char *url, char *why, size_t n) {
    size_t scheme = strncmp(url, "amqps://", 8) == 0 ? 8 : strncmp(url, "amqp://", 7) == 0 ? 7 : 0;
    if (!scheme) {
        const char *e = strstr(url, "://");
        if (e) snprintf(why, n, "unknown scheme '%.*s' (want amqp:// or amqps://)",
                        (int)(e - url) > 32 ? 32 : (int)(e - url), url);
        else snprintf(why, n, "not a URL (want amqp://user:password@host:port/vhost)");
        return CV_ECONFIG;
    }
    /* a port librabbitmq would take (it reads digits, then stops) is still checked whole */
    const char *auth = url + scheme, *at = userinfo_end(auth), *host = at ? at + 1 : auth;
    const char *slash = strchr(host, '/'), *colon = strchr(host, ':');
    if (colon && (!slash || colon < slash) && host[0] != '[') {
        const char *pend = slash ? slash : colon + strlen(colon);
        if (!valid_port(colon + 1, (size_t)(pend - colon - 1))) {
            snprintf(why, n, "the port must be a number from 1 to 65535");
            return CV_ECONFIG;
        }
    }
    char *copy = xstrdup(url);
    struct amqp_connection_info info;
    amqp_default_connection_info(&info);
    int st = amqp_parse_url(copy, &info);
    free(copy);
    if (st != AMQP_STATUS_OK) {
        snprintf(why, n, "not a valid URL (want amqp://user:password@host:port/vhost)");
        return CV_ECONFIG;
    }
    return 0;
}

/* One URL, or a list of them separated by commas (nodes of one cluster). */
static int check_amqp(const char *url, char *why, size_t n) {
    int k = url_list_count(url);
    if (k == 1) return check_amqp_one(url, why, n);
    bool tls = strncmp(url, "amqps://", 8) == 0;
    for (int i = 0; i < k; i++) {
        char item[1024], inner[512];
        if (!url_list_item(url, i, item, sizeof item)) {
            snprintf(why, n, "URL %d of the list is too long", i + 1);
            return CV_ECONFIG;
        }
        if (check_amqp_one(item, inner, sizeof inner) < 0) {
            snprintf(why, n, "URL %d of the list: %s", i + 1, inner);
            return CV_ECONFIG;
        }
        if ((strncmp(item, "amqps://", 8) == 0) != tls) {
            snprintf(why, n, "URL %d of the list: every URL is amqp://, or every one amqps://", i + 1);
            return CV_ECONFIG;
        }
    }
    return 0;
}

int url_check(enum url_kind kind, const char *url, char *why, size_t n) {
    why[0] = '\0';
    if (!url || !*url) {
        snprintf(why, n, "empty");
        return CV_ECONFIG;
    }
    if (kind == URL_POSTGRES) return check_postgres(url, why, n);
    if (kind == URL_AMQP) return check_amqp(url, why, n);
    struct redis_url r;
    return url_parse_redis(url, &r, why, n);
}
