/* cfg.c - queues.conf (libconfig), checked strictly, then CONVEYOR_* overrides. */
#include "core.h"

#include <ctype.h>
#include <errno.h>
#include <arpa/inet.h>
#include <libconfig.h>
#include <stdarg.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *transport_name(enum transport t) {
    return t == TRANSPORT_REDIS ? "redis" : "rabbitmq";
}

bool transport_parse(const char *s, enum transport *t) {
    if (strcmp(s, "rabbitmq") == 0) { *t = TRANSPORT_RABBITMQ; return true; }
    if (strcmp(s, "redis") == 0) { *t = TRANSPORT_REDIS; return true; }
    return false;
}

/* Loader state: the file name and the error buffer. The loader's helpers
 * return 0, or CV_ECONFIG with the message in err (fail). */
struct loader {
    const char *file;
    char *err;
    size_t errlen;
};

static int fail(struct loader *l, const config_setting_t *s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(struct loader *l, const config_setting_t *s, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (s && config_setting_source_line(s))
        snprintf(l->err, l->errlen, "%s:%d: %s", l->file, config_setting_source_line(s), msg);
    else
        snprintf(l->err, l->errlen, "%s: %s", l->file, msg);
    return CV_ECONFIG;
}

/* The dotted path of a setting, for messages ("queues.[1].workers"). */
static void setting_path(const config_setting_t *s, char *out, size_t n) {
    if (!s || !config_setting_parent(s)) { out[0] = '\0'; return; }
    char parent[256];
    setting_path(config_setting_parent(s), parent, sizeof parent);
    const char *name = config_setting_name(s);
    char self[96];
    if (name) snprintf(self, sizeof self, "%s", name);
    else snprintf(self, sizeof self, "[%d]", config_setting_index(s));
    snprintf(out, n, "%s%s%s", parent, parent[0] ? "." : "", self);
}

/* Refuses any member of group g not named in allowed (NULL-terminated). */
static int only_known(struct loader *l, const config_setting_t *g, const char *const *allowed) {
    for (int i = 0; i < config_setting_length(g); i++) {
        config_setting_t *m = config_setting_get_elem(g, (unsigned)i);
        const char *name = config_setting_name(m);
        bool ok = false;
        for (const char *const *a = allowed; *a && !ok; a++) ok = strcmp(*a, name) == 0;
        if (!ok) {
            char p[256];
            setting_path(m, p, sizeof p);
            return fail(l, m, "unknown setting '%s'", p);
        }
    }
    return 0;
}

/* Reads an optional string member; keeps *out when absent. */
static int get_string(struct loader *l, const config_setting_t *g, const char *name, char **out) {
    config_setting_t *s = g ? config_setting_get_member(g, name) : NULL;
    if (!s) return 0;
    char p[256];
    setting_path(s, p, sizeof p);
    if (config_setting_type(s) != CONFIG_TYPE_STRING) return fail(l, s, "'%s' must be a string", p);
    const char *v = config_setting_get_string(s);
    if (!*v) return fail(l, s, "'%s' must not be empty", p);
    free(*out);
    *out = xstrdup(v);
    return 0;
}

/* Reads an optional member that is a string or a list of strings (the nodes of
 * one RabbitMQ cluster), the list joined by commas; keeps *out when absent. */
static int get_string_or_list(struct loader *l, const config_setting_t *g, const char *name, char **out) {
    config_setting_t *s = g ? config_setting_get_member(g, name) : NULL;
    if (!s || config_setting_type(s) == CONFIG_TYPE_STRING) return get_string(l, g, name, out);
    char p[256];
    setting_path(s, p, sizeof p);
    int t = config_setting_type(s), n = config_setting_length(s);
    if ((t != CONFIG_TYPE_LIST && t != CONFIG_TYPE_ARRAY) || n < 1)
        return fail(l, s, "'%s' must be a string or a list of strings", p);
    size_t len = 0;
    for (int i = 0; i < n; i++) {
        const char *v = config_setting_get_string_elem(s, i);
        if (!v || !*v || strchr(v, ',')) return fail(l, s, "'%s': item %d must be a non-empty string without ','", p, i + 1);
        len += strlen(v) + 1;
    }
    char *joined = xmalloc(len);
    joined[0] = '\0';
    for (int i = 0; i < n; i++) {
        if (i) strcat(joined, ",");
        strcat(joined, config_setting_get_string_elem(s, i));
    }
    free(*out);
    *out = joined;
    return 0;
}

/* Reads an optional integer member in [min, max]; keeps *out when absent. */
static int get_long(struct loader *l, const config_setting_t *g, const char *name, long min,
                    long max, long *out) {
    config_setting_t *s = g ? config_setting_get_member(g, name) : NULL;
    if (!s) return 0;
    char p[256];
    setting_path(s, p, sizeof p);
    int t = config_setting_type(s);
    if (t != CONFIG_TYPE_INT && t != CONFIG_TYPE_INT64) return fail(l, s, "'%s' must be an integer", p);
    long long v = config_setting_get_int64(s);
    if (t == CONFIG_TYPE_INT) v = config_setting_get_int(s);
    if (v < min || v > max) return fail(l, s, "'%s' must be between %ld and %ld (got %lld)", p, min, max, v);
    *out = (long)v;
    return 0;
}

static int get_int(struct loader *l, const config_setting_t *g, const char *name, long min, long max,
                   int *out) {
    long v = *out;
    if (get_long(l, g, name, min, max, &v) < 0) return CV_ECONFIG;
    *out = (int)v;
    return 0;
}

static int get_group(struct loader *l, const config_setting_t *root, const char *name,
                     const char *const *allowed, config_setting_t **out) {
    *out = config_setting_get_member(root, name);
    if (!*out) return 0;
    if (config_setting_type(*out) != CONFIG_TYPE_GROUP)
        return fail(l, *out, "'%s' must be a group { ... }", name);
    return only_known(l, *out, allowed);
}

static bool valid_name(const char *s) {
    if (!*s || strlen(s) >= CFG_NAME_MAX) return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '_' && *s != '-') return false;
    return true;
}

static int load_queue(struct loader *l, struct cfg *c, config_setting_t *qs, enum transport deflt,
                      struct cfg_queue *q) {
    static const char *const keys[] = {"name", "commands", "workers", "prefetch", "transport",
                                       "queue_type", "max_attempts", "batch_size", "statement_timeout_ms",
                                       "lock_timeout_ms", "idle_in_transaction_timeout_ms", "max_length", "lanes",
                                       "ordered", NULL};
    char p[256];
    setting_path(qs, p, sizeof p);
    if (config_setting_type(qs) != CONFIG_TYPE_GROUP)
        return fail(l, qs, "'%s' must be a group { name = ...; commands = [...]; }", p);
    if (only_known(l, qs, keys) < 0) return CV_ECONFIG;
    const char *name = NULL;
    if (!config_setting_lookup_string(qs, "name", &name))
        return fail(l, qs, "'%s.name' is required and must be a string", p);
    if (!valid_name(name))
        return fail(l, qs, "'%s.name' must be 1-63 letters, digits, '_' or '-' (got '%s')", p, name);
    snprintf(q->name, sizeof q->name, "%s", name);
    q->transport = deflt;
    q->workers = 2;
    q->prefetch = 8;
    q->quorum = true;
    q->max_attempts = 10;
    q->batch_size = 1;
    q->statement_timeout_ms = 30000;
    q->lock_timeout_ms = 10000;
    q->idle_in_transaction_timeout_ms = 60000; /* room for a batch's password hashes (0.1 s each) */
    char *tr = NULL, *qt = NULL;
    if (get_string(l, qs, "transport", &tr) < 0) return CV_ECONFIG;
    if (tr && !transport_parse(tr, &q->transport)) {
        free(tr);
        return fail(l, config_setting_get_member(qs, "transport"),
                    "'%s.transport' must be \"rabbitmq\" or \"redis\"", p);
    }
    free(tr);
    if (get_string(l, qs, "queue_type", &qt) < 0) return CV_ECONFIG;
    if (qt && strcmp(qt, "quorum") != 0 && strcmp(qt, "classic") != 0) {
        free(qt);
        return fail(l, config_setting_get_member(qs, "queue_type"),
                    "'%s.queue_type' must be \"quorum\" or \"classic\"", p);
    }
    if (qt) q->quorum = strcmp(qt, "quorum") == 0;
    free(qt);
    if (get_int(l, qs, "workers", 0, 256, &q->workers) < 0) return CV_ECONFIG;
    if (get_int(l, qs, "prefetch", 1, 65535, &q->prefetch) < 0) return CV_ECONFIG;
    if (get_int(l, qs, "max_attempts", 1, 1000, &q->max_attempts) < 0) return CV_ECONFIG;
    if (get_int(l, qs, "batch_size", 1, 1000, &q->batch_size) < 0) return CV_ECONFIG;
    int max_length = 0; /* bounded queues: 0 unbounded */
    if (get_int(l, qs, "max_length", 0, 1000000000, &max_length) < 0) return CV_ECONFIG;
    q->max_length = max_length;
    q->lanes = 1;
    if (get_int(l, qs, "lanes", 1, LANES_MAX, &q->lanes) < 0) return CV_ECONFIG;
    config_setting_t *ord = config_setting_get_member(qs, "ordered");
    if (ord && config_setting_type(ord) != CONFIG_TYPE_BOOL)
        return fail(l, ord, "'%s.ordered' must be true or false", p);
    q->ordered = ord && config_setting_get_bool(ord);
    if (q->ordered && q->lanes < 2)
        return fail(l, ord, "'%s.ordered' needs lanes (lanes = 2 to %d): one lane in order would serve the "
                    "whole queue one command at a time", p, LANES_MAX);
    if (get_int(l, qs, "statement_timeout_ms", 100, 86400000, &q->statement_timeout_ms) < 0 ||
        get_int(l, qs, "lock_timeout_ms", 0, 86400000, &q->lock_timeout_ms) < 0 ||
        get_int(l, qs, "idle_in_transaction_timeout_ms", 1000, 86400000, &q->idle_in_transaction_timeout_ms) < 0)
        return CV_ECONFIG;
    if (q->lock_timeout_ms > q->statement_timeout_ms) { /* a lock is waited for inside a statement */
        config_setting_t *lock = config_setting_get_member(qs, "lock_timeout_ms");
        if (lock)
            return fail(l, lock, "'%s.lock_timeout_ms' must not be above its statement_timeout_ms (%d)", p,
                        q->statement_timeout_ms);
        q->lock_timeout_ms = q->statement_timeout_ms; /* the default, under a shorter statement_timeout_ms */
    }

    config_setting_t *cmds = config_setting_get_member(qs, "commands");
    if (!cmds || (config_setting_type(cmds) != CONFIG_TYPE_ARRAY &&
                  config_setting_type(cmds) != CONFIG_TYPE_LIST))
        return fail(l, cmds ? cmds : qs, "'%s.commands' is required: a list of command types", p);
    int n = config_setting_length(cmds);
    if (n == 0) return fail(l, cmds, "'%s.commands' must name at least one command type", p);
    q->commands = xcalloc((size_t)n, sizeof *q->commands);
    for (int i = 0; i < n; i++) {
        config_setting_t *e = config_setting_get_elem(cmds, (unsigned)i);
        if (config_setting_type(e) != CONFIG_TYPE_STRING || !*config_setting_get_string(e))
            return fail(l, e, "'%s.commands' must hold non-empty strings", p);
        const char *t = config_setting_get_string(e);
        const struct cfg_queue *other = cfg_queue_for(c, t);
        if (other) return fail(l, e, "command '%s' is routed twice (queues '%s' and '%s')", t, other->name, q->name);
        for (int j = 0; j < q->ncommands; j++)
            if (strcmp(q->commands[j], t) == 0) return fail(l, e, "command '%s' is listed twice in '%s'", t, q->name);
        q->commands[q->ncommands++] = xstrdup(t);
    }
    return 0;
}

#define SECRET_FILE_MAX 65536 /* a secret in a file longer than this is refused */

/* The content of the file at path (what: the setting that named it, for
 * messages) into *dst, trailing newlines stripped. A file that cannot be read,
 * is empty, too long or holds a NUL byte is an error naming the setting and
 * the path, never the content. */
static int read_secret_file(struct loader *l, const char *what, const char *path, char **dst) {
    FILE *f = fopen(path, "r");
    if (!f) return fail(l, NULL, "%s: cannot read '%s': %s", what, path, strerror(errno));
    char *text = xmalloc(SECRET_FILE_MAX + 1);
    size_t n = fread(text, 1, SECRET_FILE_MAX + 1, f);
    bool bad = ferror(f);
    fclose(f);
    if (bad || n > SECRET_FILE_MAX) {
        sodium_memzero(text, SECRET_FILE_MAX + 1);
        free(text);
        return fail(l, NULL, "%s: cannot read '%s': %s", what, path, bad ? "read error" : "longer than 64 KiB");
    }
    text[n] = '\0';
    while (n && (text[n - 1] == '\n' || text[n - 1] == '\r')) text[--n] = '\0';
    if (n == 0 || strlen(text) != n) {
        sodium_memzero(text, SECRET_FILE_MAX + 1);
        free(text);
        return fail(l, NULL, "%s: '%s' %s", what, path, n ? "holds a NUL byte" : "is empty");
    }
    free(*dst);
    *dst = text;
    return 0;
}

/* The connections: database, rabbitmq (URL or node list, TLS files), redis.
 * Returns 0 or CV_ECONFIG (said through l). */
static int load_connections(struct loader *l, config_setting_t *root, struct cfg *c) {
    static const char *const k_url[] = {"url", NULL};
    static const char *const k_rabbitmq[] = {"url", "ca_file", "cert_file", "key_file", "management_url", NULL};
    static const char *const k_redis[] = {"url", "heartbeat_interval", "heartbeat_ttl", "wait_replicas",
                                          "wait_timeout_ms", NULL};
    config_setting_t *g;
    if (get_group(l, root, "database", k_url, &g) < 0 || get_string(l, g, "url", &c->database_url) < 0) return CV_ECONFIG;
    if (get_group(l, root, "rabbitmq", k_rabbitmq, &g) < 0 || get_string_or_list(l, g, "url", &c->rabbitmq_url) < 0 ||
        get_string(l, g, "ca_file", &c->rabbitmq_ca_file) < 0 || get_string(l, g, "cert_file", &c->rabbitmq_cert_file) < 0 ||
        get_string(l, g, "key_file", &c->rabbitmq_key_file) < 0 ||
        get_string(l, g, "management_url", &c->rabbitmq_management_url) < 0) return CV_ECONFIG;
    if (!c->rabbitmq_cert_file != !c->rabbitmq_key_file)
        return fail(l, g, "'rabbitmq.cert_file' and 'rabbitmq.key_file' go together: set both or neither");
    if (get_group(l, root, "redis", k_redis, &g) < 0 || get_string(l, g, "url", &c->redis_url) < 0 ||
        get_int(l, g, "heartbeat_interval", 1, 3600, &c->heartbeat_interval_s) < 0 ||
        get_int(l, g, "heartbeat_ttl", 2, 86400, &c->heartbeat_ttl_s) < 0 ||
        get_int(l, g, "wait_replicas", 0, 64, &c->redis_wait_replicas) < 0 ||
        get_int(l, g, "wait_timeout_ms", 1, 25000, &c->redis_wait_timeout_ms) < 0) return CV_ECONFIG;
    if (c->heartbeat_ttl_s <= c->heartbeat_interval_s)
        return fail(l, config_setting_get_member(g, "heartbeat_ttl"),
                    "'redis.heartbeat_ttl' must be longer than 'redis.heartbeat_interval'");
    return 0;
}

/* The tuning groups: producer, broker, retry, events (its transport defaults
 * to deflt), limits, domain, relay, supervisor, dedup. Returns 0 or CV_ECONFIG. */
static int load_tuning(struct loader *l, config_setting_t *root, enum transport deflt, struct cfg *c) {
    static const char *const k_producer[] = {"publish_retry_ms", "spool_max_bytes", NULL};
    static const char *const k_broker[] = {"reply_timeout_ms", NULL};
    static const char *const k_retry[] = {"base_delay_ms", "max_delay_ms", NULL};
    static const char *const k_events[] = {"transport", "stream_maxlen", NULL};
    static const char *const k_limits[] = {"max_message_bytes", NULL};
    static const char *const k_domain[] = {"stock_low_threshold", "password_hash_opslimit",
                                           "password_hash_memlimit_mb", NULL};
    static const char *const k_relay[] = {"poll_interval_ms", "batch_size", "retention_seconds", NULL};
    static const char *const k_sup[] = {"shutdown_timeout", "max_jobs", "max_rss_mb", NULL};
    static const char *const k_dedup[] = {"retention_days", "prune_batch", NULL};
    config_setting_t *g;
    char *tr = NULL;
    if (get_group(l, root, "producer", k_producer, &g) < 0 ||
        get_int(l, g, "publish_retry_ms", 0, 3600000, &c->publish_retry_ms) < 0 ||
        get_long(l, g, "spool_max_bytes", 4096, 1L << 40, &c->spool_max_bytes) < 0) return CV_ECONFIG;
    if (get_group(l, root, "broker", k_broker, &g) < 0 ||
        get_int(l, g, "reply_timeout_ms", 1000, 120000, &c->broker_reply_timeout_ms) < 0) return CV_ECONFIG;
    if (get_group(l, root, "retry", k_retry, &g) < 0 ||
        get_int(l, g, "base_delay_ms", 1, 3600000, &c->retry_base_ms) < 0 ||
        get_int(l, g, "max_delay_ms", 1, 86400000, &c->retry_max_ms) < 0) return CV_ECONFIG;
    if (c->retry_max_ms < c->retry_base_ms)
        return fail(l, config_setting_get_member(g, "max_delay_ms"), "'retry.max_delay_ms' must not be below 'retry.base_delay_ms'");

    c->events_transport = deflt;
    if (get_group(l, root, "events", k_events, &g) < 0) return CV_ECONFIG;
    if (get_string(l, g, "transport", &tr) < 0) return CV_ECONFIG;
    if (tr && !transport_parse(tr, &c->events_transport)) {
        free(tr);
        return fail(l, config_setting_get_member(g, "transport"), "'events.transport' must be \"rabbitmq\" or \"redis\"");
    }
    free(tr);
    if (get_long(l, g, "stream_maxlen", 1, 1000000000L, &c->events_maxlen) < 0) return CV_ECONFIG;
    if (get_group(l, root, "limits", k_limits, &g) < 0 ||
        get_long(l, g, "max_message_bytes", 64, 100L * 1024 * 1024, &c->max_message_bytes) < 0) return CV_ECONFIG;
    if (get_group(l, root, "domain", k_domain, &g) < 0 ||
        get_int(l, g, "stock_low_threshold", 0, 2147483647L, &c->stock_low_threshold) < 0 ||
        get_int(l, g, "password_hash_opslimit", 1, 100, &c->password_opslimit) < 0 ||
        get_int(l, g, "password_hash_memlimit_mb", 1, 4096, &c->password_memlimit_mb) < 0) return CV_ECONFIG;
    if (get_group(l, root, "relay", k_relay, &g) < 0 ||
        get_int(l, g, "poll_interval_ms", 10, 60000, &c->relay_poll_ms) < 0 ||
        get_int(l, g, "batch_size", 1, 10000, &c->relay_batch) < 0 ||
        get_long(l, g, "retention_seconds", 0, 365L * 86400, &c->outbox_retention_s) < 0) return CV_ECONFIG;
    if (get_group(l, root, "supervisor", k_sup, &g) < 0 ||
        get_int(l, g, "shutdown_timeout", 1, 3600, &c->shutdown_timeout_s) < 0 ||
        get_int(l, g, "max_jobs", 0, 2147483647L, &c->max_jobs) < 0 ||
        get_int(l, g, "max_rss_mb", 0, 1048576, &c->max_rss_mb) < 0) return CV_ECONFIG;
    if (get_group(l, root, "dedup", k_dedup, &g) < 0 ||
        get_int(l, g, "retention_days", 0, 36500, &c->dedup_retention_days) < 0 ||
        get_int(l, g, "prune_batch", 1, 100000, &c->dedup_prune_batch) < 0) return CV_ECONFIG;

    return 0;
}

/* The breaker group (the database breaker, workers/breaker.c): failures,
 * backoff_ms, max_backoff_ms. Returns 0 or CV_ECONFIG. */
static int load_breaker(struct loader *l, config_setting_t *root, struct cfg *c) {
    static const char *const k_breaker[] = {"failures", "backoff_ms", "max_backoff_ms", NULL};
    config_setting_t *g;
    if (get_group(l, root, "breaker", k_breaker, &g) < 0 ||
        get_int(l, g, "failures", 1, 1000, &c->breaker_failures) < 0 ||
        get_int(l, g, "backoff_ms", 100, 3600000, &c->breaker_backoff_ms) < 0 ||
        get_int(l, g, "max_backoff_ms", 100, 3600000, &c->breaker_max_backoff_ms) < 0) return CV_ECONFIG;
    if (c->breaker_max_backoff_ms < c->breaker_backoff_ms)
        return fail(l, config_setting_get_member(g, "max_backoff_ms"),
                    "'breaker.max_backoff_ms' must not be below 'breaker.backoff_ms'");
    return 0;
}

/* The http group: listen, token or token_file. Returns 0 or CV_ECONFIG. */
static int load_http(struct loader *l, config_setting_t *root, struct cfg *c) {
    static const char *const k_http[] = {"listen", "token", "token_file", NULL};
    config_setting_t *g;
    char *token_file = NULL;
    if (get_group(l, root, "http", k_http, &g) < 0 || get_string(l, g, "listen", &c->http_listen) < 0 ||
        get_string(l, g, "token", &c->http_token) < 0 || get_string(l, g, "token_file", &token_file) < 0) {
        free(token_file);
        return CV_ECONFIG;
    }
    if (token_file) {
        int rc = c->http_token ? fail(l, config_setting_get_member(g, "token_file"),
                                      "'http.token' and 'http.token_file' are both set; set one of them")
                               : read_secret_file(l, "http.token_file", token_file, &c->http_token);
        free(token_file);
        if (rc < 0) return CV_ECONFIG;
    }
    if (c->http_token && strlen(c->http_token) < HTTP_TOKEN_MIN)
        return fail(l, NULL, "the http token (http.token or http.token_file) must be at least %d characters "
                             "(say: openssl rand -hex 24)", HTTP_TOKEN_MIN);
    char host[64];
    int port;
    bool v6;
    if (c->http_listen && !cfg_http_address(c->http_listen, host, sizeof host, &port, &v6))
        return fail(l, config_setting_get_member(g, "listen"),
                    "'http.listen' must be \"IPv4:PORT\" or \"[IPv6]:PORT\" (say \"127.0.0.1:9464\"), port 1-65535");

    return 0;
}

/* The queues list (each through load_queue; names unique). Returns 0 or CV_ECONFIG. */
static int load_queues(struct loader *l, config_setting_t *root, enum transport deflt, struct cfg *c) {
    config_setting_t *qs = config_setting_get_member(root, "queues");
    if (!qs) return fail(l, NULL, "'queues' is required: a list of ( { name = ...; commands = [...]; }, ... )");
    if (config_setting_type(qs) != CONFIG_TYPE_LIST)
        return fail(l, qs, "'queues' must be a list ( { ... }, { ... } )");
    int n = config_setting_length(qs);
    if (n == 0) return fail(l, qs, "'queues' must hold at least one queue");
    c->queues = xcalloc((size_t)n, sizeof *c->queues);
    for (int i = 0; i < n; i++) {
        struct cfg_queue *q = &c->queues[i];
        int rc = load_queue(l, c, config_setting_get_elem(qs, (unsigned)i), deflt, q);
        c->nqueues = i + 1; /* so cfg_free sees what was allocated */
        if (rc < 0) return CV_ECONFIG;
        for (int j = 0; j < i; j++)
            if (strcmp(c->queues[j].name, q->name) == 0)
                return fail(l, config_setting_get_elem(qs, (unsigned)i), "queue '%s' is defined twice", q->name);
    }
    return 0;
}

/* The schedules list (optional; each read by cfg_schedule_read, names unique,
 * the type routed by some queue). Returns 0 or CV_ECONFIG, naming the schedule
 * (or its index) and the field. */
static int load_schedules(struct loader *l, config_setting_t *root, struct cfg *c) {
    static const char *const keys[] = {"name", "cron", "every", "timezone", "type", "payload", "catch_up",
                                       "catch_up_window", NULL};
    config_setting_t *ss = config_setting_get_member(root, "schedules");
    if (!ss) return 0;
    if (config_setting_type(ss) != CONFIG_TYPE_LIST)
        return fail(l, ss, "'schedules' must be a list ( { name = ...; cron = ...; type = ...; }, ... )");
    int n = config_setting_length(ss);
    c->schedules = n ? xcalloc((size_t)n, sizeof *c->schedules) : NULL;
    for (int i = 0; i < n; i++) {
        config_setting_t *g = config_setting_get_elem(ss, (unsigned)i);
        struct cfg_schedule *s = &c->schedules[i];
        c->nschedules = i + 1; /* so cfg_free sees what was allocated */
        if (config_setting_type(g) != CONFIG_TYPE_GROUP)
            return fail(l, g, "'schedules.[%d]' must be a group { name = ...; cron = ...; type = ...; }", i);
        if (only_known(l, g, keys) < 0) return CV_ECONFIG;
        char why[512], who[96];
        const config_setting_t *where = g;
        int rc = cfg_schedule_read(g, s, why, sizeof why, &where);
        if (s->name[0]) snprintf(who, sizeof who, "schedule '%s' (schedules.[%d])", s->name, i);
        else snprintf(who, sizeof who, "schedule schedules.[%d]", i);
        if (rc < 0) return fail(l, where, "%s: %s", who, why);
        if (!cfg_queue_for(c, s->type))
            return fail(l, config_setting_get_member(g, "type"), "%s: 'type' \"%s\" is routed by no queue "
                        "(a schedule sends a command type some queue lists in its commands)", who, s->type);
        for (int j = 0; j < i; j++)
            if (strcmp(c->schedules[j].name, s->name) == 0)
                return fail(l, config_setting_get_member(g, "name"), "%s: 'name' is used twice", who);
    }
    return 0;
}

/* The rate_limits list (optional; each read by cfg_rate_limit_read, names
 * unique, a command type counted by one limit at most). Returns 0 or
 * CV_ECONFIG, naming the limit (or its index) and the field. */
static int load_rate_limits(struct loader *l, config_setting_t *root, struct cfg *c) {
    static const char *const keys[] = {"name", "types", "queue", "rate", "burst", "key", "over", "shards", NULL};
    config_setting_t *ls = config_setting_get_member(root, "rate_limits");
    if (!ls) return 0;
    if (config_setting_type(ls) != CONFIG_TYPE_LIST)
        return fail(l, ls, "'rate_limits' must be a list ( { name = ...; types = [...]; rate = \"100/s\"; }, ... )");
    int n = config_setting_length(ls);
    c->rate_limits = n ? xcalloc((size_t)n, sizeof *c->rate_limits) : NULL;
    for (int i = 0; i < n; i++) {
        config_setting_t *g = config_setting_get_elem(ls, (unsigned)i);
        struct cfg_rate_limit *rl = &c->rate_limits[i];
        const struct cfg_queue *q = NULL;
        if (config_setting_type(g) != CONFIG_TYPE_GROUP)
            return fail(l, g, "'rate_limits.[%d]' must be a group { name = ...; types = [...]; rate = ...; }", i);
        if (only_known(l, g, keys) < 0) return CV_ECONFIG;
        char why[512], who[96];
        const config_setting_t *where = g;
        int rc = cfg_rate_limit_read(g, rl, why, sizeof why, &where);
        c->nrate_limits = i + 1; /* so cfg_free sees what was allocated */
        if (rl->name[0]) snprintf(who, sizeof who, "rate limit '%s' (rate_limits.[%d])", rl->name, i);
        else snprintf(who, sizeof who, "rate limit rate_limits.[%d]", i);
        if (rc < 0) return fail(l, where, "%s: %s", who, why);
        if (rl->queue[0] && !(q = cfg_queue_named(c, rl->queue)))
            return fail(l, config_setting_get_member(g, "queue"), "%s: 'queue' \"%s\" is no queue of 'queues'", who,
                        rl->queue);
        for (int k = 0; rl->queue[0] && k < q->ncommands; k++) cfg_rate_limit_add_type(rl, q->commands[k]);
        for (int k = 0; !rl->queue[0] && k < rl->ntypes; k++)
            if (!cfg_queue_for(c, rl->types[k]))
                return fail(l, config_setting_get_member(g, "types"), "%s: 'types': \"%s\" is routed by no queue (a "
                            "limit counts command types some queue lists in its commands)", who, rl->types[k]);
        for (int j = 0; j < i; j++) {
            if (strcmp(c->rate_limits[j].name, rl->name) == 0)
                return fail(l, config_setting_get_member(g, "name"), "%s: 'name' is used twice", who);
            for (int k = 0; k < rl->ntypes; k++)
                for (int m = 0; m < c->rate_limits[j].ntypes; m++)
                    if (strcmp(rl->types[k], c->rate_limits[j].types[m]) == 0)
                        return fail(l, g, "%s: command type '%s' is counted by rate limit '%s' too (a type is "
                                    "in one limit at most)", who, rl->types[k], c->rate_limits[j].name);
        }
    }
    return 0;
}

/* The database name of a PostgreSQL URL ("postgresql://u:p@h:5432/shop?x=y"
 * gives "shop") into out; "" when it has none. */
static void url_dbname(const char *url, char *out, size_t n) {
    const char *p = strstr(url, "://");
    p = p ? strchr(p + 3, '/') : NULL;
    size_t len = p ? strcspn(p + 1, "?#") : 0;
    snprintf(out, n, "%.*s", (int)(len < n ? len : n - 1), p ? p + 1 : "");
}

/* The producers list (optional): each a URL string (named after its database)
 * or a group { name; url or url_file; } (url_file: a file holding the URL, so
 * that no password sits in queues.conf); names unique and valid, URLs
 * PostgreSQL URLs (checked, redacted in messages). Returns 0 or CV_ECONFIG
 * naming the entry. */
static int load_producers(struct loader *l, config_setting_t *root, struct cfg *c) {
    static const char *const keys[] = {"name", "url", "url_file", NULL};
    config_setting_t *ls = config_setting_get_member(root, "producers");
    if (!ls) return 0;
    if (config_setting_type(ls) != CONFIG_TYPE_LIST && config_setting_type(ls) != CONFIG_TYPE_ARRAY)
        return fail(l, ls, "'producers' must be a list ( \"postgresql://...\", { name = \"shop\"; url = \"postgresql://...\"; } )");
    int n = config_setting_length(ls);
    c->producers = n ? xcalloc((size_t)n, sizeof *c->producers) : NULL;
    for (int i = 0; i < n; i++) {
        config_setting_t *e = config_setting_get_elem(ls, (unsigned)i);
        struct cfg_producer *pr = &c->producers[i];
        c->nproducers = i + 1; /* so cfg_free sees what was allocated */
        char *name = NULL, *file = NULL, what[48];
        int rc = 0;
        snprintf(what, sizeof what, "producers.[%d].url_file", i);
        if (config_setting_type(e) == CONFIG_TYPE_STRING) {
            pr->url = xstrdup(config_setting_get_string(e));
        } else if (config_setting_type(e) == CONFIG_TYPE_GROUP) {
            if (only_known(l, e, keys) < 0 || get_string(l, e, "url", &pr->url) < 0 ||
                get_string(l, e, "url_file", &file) < 0 || get_string(l, e, "name", &name) < 0)
                rc = CV_ECONFIG;
            else if (pr->url && file)
                rc = fail(l, e, "'producers.[%d]': 'url' and 'url_file' are both set; set one of them", i);
            else if (file)
                rc = read_secret_file(l, what, file, &pr->url);
            else if (!pr->url)
                rc = fail(l, e, "'producers.[%d]' needs a url (or url_file)", i);
        } else {
            rc = fail(l, e, "'producers.[%d]' must be a URL string or a group { name = ...; url = ...; }", i);
        }
        free(file);
        if (rc < 0) {
            free(name);
            return rc;
        }
        if (name) snprintf(pr->name, sizeof pr->name, "%s", name);
        else url_dbname(pr->url, pr->name, sizeof pr->name);
        bool too_long = name && strlen(name) >= sizeof pr->name;
        free(name);
        char why[256], shown[512];
        if (url_check(URL_POSTGRES, pr->url, why, sizeof why) < 0) {
            url_redact(pr->url, shown, sizeof shown);
            return fail(l, e, "'producers.[%d]': %s (%s)", i, why, shown);
        }
        if (too_long || !valid_name(pr->name))
            return fail(l, e, "'producers.[%d]': the name \"%s\" must be 1-%d letters, digits, '_' or '-' (give "
                        "`name` when the URL's database name is not one)", i, pr->name, CFG_NAME_MAX - 1);
        for (int j = 0; j < i; j++)
            if (strcmp(c->producers[j].name, pr->name) == 0)
                return fail(l, e, "'producers.[%d]': the name \"%s\" is used twice", i, pr->name);
    }
    return 0;
}

static int load(struct loader *l, config_t *lc, struct cfg *c) {
    static const char *const top[] = {"prefix", "transport", "database", "rabbitmq", "redis", "events",
                                      "limits", "domain", "relay", "supervisor", "retry", "dedup", "http", "producer", "broker", "queues",
                                      "schedules", "rate_limits", "breaker", "producers", NULL};
    config_setting_t *root = config_root_setting(lc);
    if (only_known(l, root, top) < 0) return CV_ECONFIG;

    if (get_string(l, root, "prefix", &c->prefix) < 0) return CV_ECONFIG;
    if (!valid_name(c->prefix)) return fail(l, config_setting_get_member(root, "prefix"),
                                            "'prefix' must be letters, digits, '_' or '-'");
    enum transport deflt = TRANSPORT_RABBITMQ;
    char *tr = NULL;
    if (get_string(l, root, "transport", &tr) < 0) return CV_ECONFIG;
    if (tr && !transport_parse(tr, &deflt)) {
        free(tr);
        return fail(l, config_setting_get_member(root, "transport"), "'transport' must be \"rabbitmq\" or \"redis\"");
    }
    free(tr);

    if (load_connections(l, root, c) < 0 || load_tuning(l, root, deflt, c) < 0 || load_breaker(l, root, c) < 0 ||
        load_http(l, root, c) < 0 ||
        load_queues(l, root, deflt, c) < 0 || load_schedules(l, root, c) < 0 ||
        load_rate_limits(l, root, c) < 0 || load_producers(l, root, c) < 0)
        return CV_ECONFIG;
    return 0;
}

static void set_str(char **dst, const char *v) {
    free(*dst);
    *dst = xstrdup(v);
}

/* A URL from the environment: VAR, or the content of the file VAR_FILE names
 * (container secrets), trailing newlines stripped. Sets *dst and *setting (the
 * variable's name) when one is set; both set, or a file that cannot be read or
 * is empty, is an error naming the variable and the path, never the content. */
static int env_url(struct loader *l, const char *var, const char *file_var, char **dst, const char **setting) {
    const char *v = getenv(var), *path = getenv(file_var);
    bool has_v = v && *v, has_file = path && *path;
    if (has_v && has_file) return fail(l, NULL, "%s and %s are both set; set one of them", var, file_var);
    if (has_v) {
        set_str(dst, v);
        *setting = var;
        return 0;
    }
    if (!has_file) return 0;
    if (read_secret_file(l, file_var, path, dst) < 0) return CV_ECONFIG;
    *setting = file_var;
    return 0;
}

/* Checks the syntax of the URL that setting gave (url_check). */
static int check_url(struct loader *l, enum url_kind kind, const char *setting, const char *url) {
    char why[512], shown[512];
    if (url_check(kind, url, why, sizeof why) == 0) return 0;
    url_redact(url, shown, sizeof shown);
    return fail(l, NULL, "%s (%s): %s", setting, shown, why);
}

/* The environment wins over the file (README.md, "Configuration"). */
static int apply_env(struct loader *l, struct cfg *c) {
    const char *v;
    if (env_url(l, "CONVEYOR_DATABASE_URL", "CONVEYOR_DATABASE_URL_FILE", &c->database_url, &c->database_url_setting) < 0 ||
        env_url(l, "CONVEYOR_RABBITMQ_URL", "CONVEYOR_RABBITMQ_URL_FILE", &c->rabbitmq_url, &c->rabbitmq_url_setting) < 0 ||
        env_url(l, "CONVEYOR_REDIS_URL", "CONVEYOR_REDIS_URL_FILE", &c->redis_url, &c->redis_url_setting) < 0)
        return CV_ECONFIG;
    if ((v = getenv("CONVEYOR_RABBITMQ_MANAGEMENT_URL")) && *v) set_str(&c->rabbitmq_management_url, v);
    if ((v = getenv("CONVEYOR_TRANSPORT")) && *v) {
        enum transport t;
        if (!transport_parse(v, &t))
            return fail(l, NULL, "CONVEYOR_TRANSPORT must be \"rabbitmq\" or \"redis\" (got \"%s\")", v);
        for (int i = 0; i < c->nqueues; i++) c->queues[i].transport = t;
        c->events_transport = t;
    }
    if ((c->rabbitmq_ca_file || c->rabbitmq_cert_file) && strncmp(c->rabbitmq_url, "amqps://", 8) != 0)
        return fail(l, NULL, "'rabbitmq.ca_file' and 'rabbitmq.cert_file' are for TLS: the RabbitMQ URL must then be amqps://");
    if ((v = getenv("CONVEYOR_EVENTS_TRANSPORT")) && *v) {
        if (!transport_parse(v, &c->events_transport))
            return fail(l, NULL, "CONVEYOR_EVENTS_TRANSPORT must be \"rabbitmq\" or \"redis\" (got \"%s\")", v);
    }
    return 0;
}

int cfg_load(const char *path, struct cfg *c, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    c->path = xstrdup(path);
    c->prefix = xstrdup("conveyor");
    c->database_url = xstrdup("postgresql://conveyor@127.0.0.1:55432/conveyor");
    c->rabbitmq_url = xstrdup("amqp://guest:guest@127.0.0.1:55672");
    c->redis_url = xstrdup("redis://127.0.0.1:56379/0");
    c->events_maxlen = 1000000;
    c->max_message_bytes = 65536;
    c->stock_low_threshold = 10;
    c->relay_poll_ms = 1000;
    c->relay_batch = 500;
    c->outbox_retention_s = 7L * 86400;
    c->dedup_retention_days = 30;
    c->dedup_prune_batch = 1000;
    c->shutdown_timeout_s = 30;
    c->retry_base_ms = 1000;
    c->retry_max_ms = 300000;
    c->breaker_failures = 3;
    c->breaker_backoff_ms = 1000;
    c->breaker_max_backoff_ms = 15000;
    c->heartbeat_interval_s = 2;
    c->heartbeat_ttl_s = 10;
    c->redis_wait_timeout_ms = 1000;
    c->publish_retry_ms = 30000;
    c->spool_max_bytes = 64L * 1024 * 1024;
    c->broker_reply_timeout_ms = 10000;
    c->password_opslimit = 2;      /* crypto_pwhash_OPSLIMIT_INTERACTIVE */
    c->password_memlimit_mb = 64;  /* crypto_pwhash_MEMLIMIT_INTERACTIVE */
    c->database_url_setting = "database.url";
    c->rabbitmq_url_setting = "rabbitmq.url";
    c->redis_url_setting = "redis.url";

    struct loader l = {path, err, errlen};
    config_t lc;
    config_init(&lc);
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "%s: cannot open: %m", path);
        config_destroy(&lc);
        cfg_free(c);
        return CV_ECONFIG;
    }
    int ok = config_read(&lc, f);
    fclose(f);
    if (!ok) {
        snprintf(err, errlen, "%s:%d: syntax error: %s", path, config_error_line(&lc), config_error_text(&lc));
        config_destroy(&lc);
        cfg_free(c);
        return CV_ECONFIG;
    }
    int rc = load(&l, &lc, c);
    config_destroy(&lc);
    if (rc == 0) rc = apply_env(&l, c);
    if (rc == 0) rc = check_url(&l, URL_POSTGRES, c->database_url_setting, c->database_url);
    if (rc == 0 && cfg_uses(c, TRANSPORT_RABBITMQ)) rc = check_url(&l, URL_AMQP, c->rabbitmq_url_setting, c->rabbitmq_url);
    if (rc == 0 && cfg_uses(c, TRANSPORT_REDIS)) rc = check_url(&l, URL_REDIS, c->redis_url_setting, c->redis_url);
    if (rc < 0) cfg_free(c);
    return rc; /* 0 or CV_ECONFIG */
}

void cfg_free(struct cfg *c) {
    if (!c) return;
    for (int i = 0; i < c->nqueues; i++) {
        for (int j = 0; j < c->queues[i].ncommands; j++) free(c->queues[i].commands[j]);
        free(c->queues[i].commands);
        free(c->queues[i].order_fields);
    }
    free(c->queues);
    for (int i = 0; i < c->nschedules; i++) cfg_schedule_free(&c->schedules[i]);
    free(c->schedules);
    for (int i = 0; i < c->nrate_limits; i++) cfg_rate_limit_free(&c->rate_limits[i]);
    free(c->rate_limits);
    for (int i = 0; i < c->nproducers; i++) {
        if (c->producers[i].url) sodium_memzero(c->producers[i].url, strlen(c->producers[i].url));
        free(c->producers[i].url);
    }
    free(c->producers);
    free(c->path);
    free(c->prefix);
    free(c->database_url);
    free(c->rabbitmq_url);
    free(c->rabbitmq_ca_file);
    free(c->rabbitmq_cert_file);
    free(c->rabbitmq_key_file);
    free(c->rabbitmq_management_url);
    free(c->redis_url);
    free(c->http_listen);
    if (c->http_token) sodium_memzero(c->http_token, strlen(c->http_token));
    free(c->http_token);
    memset(c, 0, sizeof *c);
}

const struct cfg_queue *cfg_queue_for(const struct cfg *c, const char *type) {
    for (int i = 0; i < c->nqueues; i++)
        for (int j = 0; j < c->queues[i].ncommands; j++)
            if (strcmp(c->queues[i].commands[j], type) == 0) return &c->queues[i];
    return NULL;
}

void cfg_set_order_field(struct cfg *c, const char *type, const char *field) {
    for (int i = 0; i < c->nqueues; i++) {
        struct cfg_queue *q = &c->queues[i];
        for (int j = 0; j < q->ncommands; j++) {
            if (strcmp(q->commands[j], type) != 0) continue;
            if (!q->order_fields) q->order_fields = xcalloc((size_t)q->ncommands, sizeof *q->order_fields);
            q->order_fields[j] = field;
            return;
        }
    }
}

const struct cfg_queue *cfg_queue_named(const struct cfg *c, const char *name) {
    for (int i = 0; i < c->nqueues; i++)
        if (strcmp(c->queues[i].name, name) == 0) return &c->queues[i];
    return NULL;
}

bool cfg_uses(const struct cfg *c, enum transport t) {
    if (c->events_transport == t) return true;
    for (int i = 0; i < c->nqueues; i++)
        if (c->queues[i].transport == t) return true;
    return false;
}

bool cfg_http_address(const char *listen, char *host, size_t n, int *port, bool *v6) {
    const char *colon = strrchr(listen, ':');
    if (!colon || colon == listen) return false;
    const char *h = listen;
    size_t len = (size_t)(colon - listen);
    *v6 = h[0] == '[';
    if (*v6) {
        if (len < 3 || h[len - 1] != ']') return false;
        h++;
        len -= 2;
    }
    if (len >= n) return false;
    memcpy(host, h, len);
    host[len] = '\0';
    unsigned char addr[sizeof(struct in6_addr)];
    if (inet_pton(*v6 ? AF_INET6 : AF_INET, host, addr) != 1) return false;
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (!isdigit((unsigned char)colon[1]) || *end || p < 1 || p > 65535) return false;
    *port = (int)p;
    return true;
}
