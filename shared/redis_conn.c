/* redis_conn.c - the Redis backend's connection (hiredis): the URL, the
 * primary found through Sentinel (ask_sentinels, check_primary), connect and
 * login, and commands with socket timeouts. Its callers are the operations
 * (broker_redis.c) and the heartbeat thread (redis_heartbeat.c), through
 * redis_internal.h; it calls neither. A broken connection is dropped and
 * re-opened by the next call.
 *
 * A silent server (a primary or Sentinel frozen with its connections open) is
 * found by socket timeouts on every read and write: broker.reply_timeout_ms (T)
 * for a command, T plus its block time for a blocking one (BLMOVE, WAIT, XREAD
 * BLOCK: set_io_timeout), 1 s for a Sentinel's answer. One that fires says so
 * (broker_note BROKER_SILENT) and drops the connection; the next command asks
 * the Sentinels again, who name the new primary once they failed over
 * (down-after-milliseconds, docs/scaling.md).
 */
#include "redis_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* redis://[[user]:password@]host[:port][/db] or redis-sentinel://...
 * (url_parse_redis) into r. Returns 0, or CV_ECONFIG with the reason in why. */
static int parse_url(struct redis_broker *r, const char *url, char *why, size_t n) {
    struct redis_url *u = &r->url;
    int rc = url_parse_redis(url, u, why, n);
    if (rc < 0) return rc;
    snprintf(r->host, sizeof r->host, "%s", u->host);
    r->port = u->port;
    return 0;
}

static bool refused_reply(const char *e);

/* With Sentinels: asks them in turn (from the one that answered last) for the
 * address of the primary of the URL's master name, into r->host and r->port
 * (a Sentinel that failed before the one that answered is logged: each has 1 s).
 * Returns 0, or CV_ERETRY with the reason in r->base.err (no Sentinel reached
 * or none knows the master: a failover may be under way); CV_ECONFIG when
 * every one answered and none named a primary (r->refused set). */
static int ask_sentinels(struct redis_broker *r) {
    const struct redis_url *u = &r->url;
    char why[sizeof r->base.err] = "";
    int answered_no = 0; /* Sentinels that answered, and did not know the master or refused us */
    for (int k = 0; k < u->nsentinels; k++) {
        int i = (r->sentinel_at + k) % u->nsentinels;
        const struct redis_sentinel *s = &u->sentinels[i];
        struct timeval tv = {1, 0};
        redisContext *c = redisConnectWithTimeout(s->host, s->port, tv);
        redisReply *rep = NULL;
        if (c && !c->err) {
            redisSetTimeout(c, tv);
            rep = redisCommand(c, "SENTINEL get-master-addr-by-name %s", u->master);
        }
        if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 && rep->element[0]->type == REDIS_REPLY_STRING &&
            rep->element[1]->type == REDIS_REPLY_STRING && atoi(rep->element[1]->str) > 0) {
            snprintf(r->host, sizeof r->host, "%s", rep->element[0]->str);
            r->port = atoi(rep->element[1]->str);
            if (k > 0) /* one before it was silent or wrong: each reconnect pays for it until it answers */
                log_warn("redis: %s; Sentinel %s:%d named the primary", why, s->host, s->port);
            r->sentinel_at = i;
            freeReplyObject(rep);
            redisFree(c);
            return 0;
        }
        if (rep && (rep->type == REDIS_REPLY_NIL ||
                    (rep->type == REDIS_REPLY_ERROR && (refused_reply(rep->str) || strncmp(rep->str, "ERR unknown command", 19) == 0))))
            answered_no++; /* no such master; a password wanted; not a Sentinel at all */
        snprintf(why, sizeof why, "Sentinel %s:%d: %s", s->host, s->port,
                 !c ? "out of memory" : c->err ? c->errstr : !rep ? "no reply"
                 : rep->type == REDIS_REPLY_ERROR ? rep->str : "does not know the master");
        if (rep) freeReplyObject(rep);
        if (c) redisFree(c);
    }
    if (answered_no == u->nsentinels) { /* a wrong master name, or Sentinels that want a password */
        r->refused = true;
        return broker_fail(&r->base, CV_ECONFIG, "redis: every Sentinel answered, and none names a primary of '%s' "
                           "(the master name in the URL? Sentinels' addresses? last: %s)", u->master, why);
    }
    return broker_fail(&r->base, CV_ERETRY, "redis: no Sentinel named the primary of '%s' (%d asked; last: %s)",
                       u->master, u->nsentinels, why);
}

/* Sets the socket timeout of every read and write on r->ctx to
 * broker.reply_timeout_ms plus block_ms (the server may rightly keep a blocking
 * command's reply that long), unless it is set so already. */
static void set_io_timeout(struct redis_broker *r, int block_ms) {
    int ms = r->base.cfg->broker_reply_timeout_ms + (block_ms > 0 ? block_ms : 0);
    if (!r->ctx || r->io_timeout_ms == ms) return;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    if (redisSetTimeout(r->ctx, tv) == REDIS_OK) r->io_timeout_ms = ms;
}

/* The next command (redis_conn_cmd, redis_conn_argv_cmd) blocks up to ms on the server: its reply may take that much longer. */
void redis_conn_block_next(struct redis_broker *r, int ms) { r->block_ms = ms; }

/* A command is sent: its socket timeout set (set_io_timeout, with the block
 * time redis_conn_block_next gave, which it consumes), and the wait noted (broker_note). */
static void before_command(struct redis_broker *r) {
    int block = r->block_ms;
    r->block_ms = 0;
    set_io_timeout(r, block);
    broker_note(BROKER_WAITING, block);
}

/* After a command that got no reply (hiredis's error on r->ctx): when it was
 * a socket timeout (the server is silent), says so (broker_note) and in the
 * message. */
static void no_reply(struct redis_broker *r, const char *what) {
    bool timed_out = r->ctx->err == REDIS_ERR_IO && strstr(r->ctx->errstr, "temporarily unavailable");
    if (timed_out) {
        broker_note(BROKER_SILENT, 0);
        broker_fail(&r->base, CV_ERETRY, "redis %s:%d %s: no reply within %d ms (the server is silent)", r->host, r->port,
                    what, r->io_timeout_ms);
        log_warn("%s", r->base.err);
    } else {
        broker_fail(&r->base, CV_ERETRY, "redis %s: %s", what, r->ctx->errstr);
    }
}

/* A connection idle for longer than this is probed before it is used (ready). */
#define PROBE_IDLE_MS 2000
/* ... and dropped when its server does not answer the probe within this (at most broker.reply_timeout_ms). */
#define PROBE_TIMEOUT_MS 2000

/* Makes r->ctx usable: connects when there is none; when it has been idle for
 * over PROBE_IDLE_MS (its server may have gone silent meanwhile, unseen: a
 * relay idle while the workers moved on), PINGs it first, and a server that
 * does not answer within PROBE_TIMEOUT_MS is silent (noted, the connection
 * dropped, another opened: through the Sentinels). Returns 0, or the class of
 * the failure with the reason in r->base.err. */
int redis_conn_ready(struct redis_broker *r) {
    if (r->ctx && clock_mono_ms() - r->replied_ms > PROBE_IDLE_MS) {
        int t = r->base.cfg->broker_reply_timeout_ms < PROBE_TIMEOUT_MS ? r->base.cfg->broker_reply_timeout_ms
                                                                        : PROBE_TIMEOUT_MS;
        struct timeval tv = {t / 1000, (t % 1000) * 1000};
        redisReply *rep = redisSetTimeout(r->ctx, tv) == REDIS_OK ? redisCommand(r->ctx, "PING") : NULL;
        r->io_timeout_ms = t;
        if (rep) {
            freeReplyObject(rep); /* an error reply (NOAUTH after a restart, LOADING) is an answer too */
            r->replied_ms = clock_mono_ms();
        } else {
            no_reply(r, "PING (idle connection)");
            redis_conn_drop(r);
        }
    }
    if (!r->ctx) return redis_conn_connect(r);
    return 0;
}

/* With Sentinels: the server reached must be a primary (ROLE), else the failover
 * is not over yet (or the Sentinel's answer is old). Returns 0, or CV_ERETRY with
 * the connection dropped. */
static int check_primary(struct redis_broker *r) {
    redisReply *rep = redisCommand(r->ctx, "ROLE");
    bool primary = rep && rep->type == REDIS_REPLY_ARRAY && rep->elements > 0 &&
                   rep->element[0]->type == REDIS_REPLY_STRING && strcmp(rep->element[0]->str, "master") == 0;
    if (rep) freeReplyObject(rep);
    if (primary) return 0;
    broker_fail(&r->base, CV_ERETRY, "redis %s:%d: named the primary of '%s' by Sentinel, but it is not one (yet)",
                r->host, r->port, r->url.master);
    redis_conn_drop(r);
    return CV_ERETRY;
}

/* Frees the connection; the next command opens another. */
void redis_conn_drop(struct redis_broker *r) {
    if (r->ctx) redisFree(r->ctx);
    r->ctx = NULL;
    r->io_timeout_ms = 0;
    r->recover = r->inflight_key[0] != '\0'; /* a BLMOVE's reply may have been lost */
}

/* True when a Redis error refuses what the URL says (the password, the user,
 * the database number) rather than a passing state (LOADING, too many clients). */
static bool refused_reply(const char *e) {
    static const char *const refusals[] = {"WRONGPASS", "NOAUTH", "NOPERM", "ERR AUTH", "ERR invalid password",
                                           "ERR Client sent AUTH", "ERR DB index", "ERR invalid DB index", NULL};
    for (const char *const *p = refusals; *p; p++)
        if (strncmp(e, *p, strlen(*p)) == 0) return true;
    return false;
}

/* The reply of one step of the login (AUTH, SELECT, PING): 0, or the connection
 * dropped and CV_ECONFIG (refused, see refused_reply) or CV_ERETRY. */
static int login_step(struct redis_broker *r, redisReply *rep, const char *what) {
    int rc = 0;
    if (!rep) {
        no_reply(r, what); /* a silent server is said so (broker_note) */
        rc = CV_ERETRY;
    } else if (rep->type == REDIS_REPLY_ERROR && refused_reply(rep->str))
        rc = broker_fail(&r->base, CV_ECONFIG, "redis %s refused: %s", what, rep->str);
    else if (rep->type == REDIS_REPLY_ERROR)
        rc = broker_fail(&r->base, CV_ERETRY, "redis %s: %s", what, rep->str);
    if (rep) freeReplyObject(rep);
    r->refused = rc == CV_ECONFIG;
    if (rc < 0) redis_conn_drop(r);
    return rc;
}

/* Connects and logs in, unless connected (redis_internal.h). */
int redis_conn_connect(struct redis_broker *r) {
    if (r->ctx && !r->ctx->err) return 0;
    redis_conn_drop(r);
    r->refused = false;
    int asked = r->url.nsentinels ? ask_sentinels(r) : 0;
    if (asked < 0) return asked;
    struct timeval tv = {3, 0};
    r->ctx = redisConnectWithTimeout(r->host, r->port, tv);
    if (!r->ctx || r->ctx->err) {
        broker_fail(&r->base, CV_ERETRY, "redis %s:%d: %s", r->host, r->port,
                    r->ctx ? r->ctx->errstr : "out of memory");
        redis_conn_drop(r);
        return CV_ERETRY;
    }
    set_io_timeout(r, 0);
    r->replied_ms = clock_mono_ms();
    redisEnableKeepAlive(r->ctx);
    int rc = 0;
    /* one command at least, so that a server that wants a password says so now (NOAUTH) */
    const struct redis_url *u = &r->url;
    if (u->password[0] && u->user[0])
        rc = login_step(r, redisCommand(r->ctx, "AUTH %s %s", u->user, u->password), "AUTH");
    else if (u->password[0])
        rc = login_step(r, redisCommand(r->ctx, "AUTH %s", u->password), "AUTH");
    if (rc == 0 && u->db) rc = login_step(r, redisCommand(r->ctx, "SELECT %d", u->db), "SELECT");
    else if (rc == 0 && !u->password[0]) rc = login_step(r, redisCommand(r->ctx, "PING"), "PING");
    if (rc == 0 && r->url.nsentinels) rc = check_primary(r);
    return rc;
}

/* The class of an error reply, with the reason in r->base.err: a server that
 * is no longer the primary (READONLY: demoted by a failover), with Sentinels,
 * ends the connection (dropped: the next command reconnects, through them) and
 * is CV_ERETRY; any other error (and READONLY from a redis:// URL, which would
 * reach the same replica again) is a refusal, CV_EREFUSED. */
static int reply_error(struct redis_broker *r, const redisReply *rep, const char *what) {
    if (r->url.nsentinels && strstr(rep->str, "READONLY")) {
        broker_fail(&r->base, CV_ERETRY, "redis %s: %s (a failover: reconnecting to the primary)", what, rep->str);
        redis_conn_drop(r);
        return CV_ERETRY;
    }
    return broker_fail(&r->base, CV_EREFUSED, "redis %s: %s", what, rep->str);
}

/* rep, or NULL with the broker error set when there is none (the connection
 * is dropped) or it is an error (freed). */
static redisReply *checked(struct redis_broker *r, redisReply *rep) {
    if (!rep) {
        no_reply(r, "command");
        redis_conn_drop(r);
        return NULL;
    }
    broker_note(BROKER_ANSWERED, 0);
    r->replied_ms = clock_mono_ms();
    if (rep->type == REDIS_REPLY_ERROR) {
        reply_error(r, rep, "command");
        freeReplyObject(rep);
        return NULL;
    }
    return rep;
}

static redisReply *vcmd(struct redis_broker *r, const char *fmt, va_list ap) {
    if (redis_conn_ready(r) < 0) {
        r->block_ms = 0;
        return NULL;
    }
    before_command(r);
    return checked(r, redisvCommand(r->ctx, fmt, ap));
}

/* A reply, or NULL with the broker error set (the connection is dropped). */
redisReply *redis_conn_cmd(struct redis_broker *r, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = vcmd(r, fmt, ap);
    va_end(ap);
    return rep;
}

/* As redis_conn_cmd, with the arguments as an array. */
redisReply *redis_conn_argv_cmd(struct redis_broker *r, int argc, const char **argv,
                                const size_t *argl) {
    if (redis_conn_ready(r) < 0) {
        r->block_ms = 0;
        return NULL;
    }
    before_command(r);
    return checked(r, redisCommandArgv(r->ctx, argc, argv, argl));
}

/* The class of the last failure: lost connection (retry) or a refused command. */
int redis_conn_last_error(struct redis_broker *r) {
    return r->ctx ? CV_EREFUSED : r->refused ? CV_ECONFIG : CV_ERETRY;
}

/* Reads the replies of n pipelined commands. Returns 0, CV_EREFUSED if Redis
 * refused one, or CV_ERETRY when the connection broke (it is then dropped). */
int redis_conn_read_replies(struct redis_broker *r, int n, const char *what) {
    return redis_conn_read_ints(r, n, what, NULL);
}

int redis_conn_read_ints(struct redis_broker *r, int n, const char *what, long long *ints) {
    int rc = 0;
    for (int i = 0; i < n; i++) {
        redisReply *rep = NULL;
        if (i == 0) before_command(r);
        if (redisGetReply(r->ctx, (void **)&rep) != REDIS_OK) {
            no_reply(r, what);
            redis_conn_drop(r);
            return CV_ERETRY;
        }
        broker_note(BROKER_ANSWERED, 0);
        r->replied_ms = clock_mono_ms();
        if (rep->type == REDIS_REPLY_ERROR && rc == 0) rc = reply_error(r, rep, what);
        if (ints) ints[i] = rep->type == REDIS_REPLY_INTEGER ? rep->integer : 0;
        freeReplyObject(rep);
        if (!r->ctx) return CV_ERETRY; /* dropped by reply_error: the other replies went with it */
    }
    return rc;
}

/* With redis.wait_replicas: waits (WAIT) until that many replicas have what this
 * connection wrote, for at most redis.wait_timeout_ms. Returns 0, or CV_ERETRY
 * when fewer had it in time (not confirmed: the caller sends it again) or the
 * connection was lost, with the reason in r->base.err. */
int redis_conn_wait_replicas(struct redis_broker *r, const char *what) {
    const struct cfg *cfg = r->base.cfg;
    if (cfg->redis_wait_replicas <= 0) return 0;
    redis_conn_block_next(r, cfg->redis_wait_timeout_ms);
    redisReply *rep = redis_conn_cmd(r, "WAIT %d %d", cfg->redis_wait_replicas, cfg->redis_wait_timeout_ms);
    if (!rep) return redis_conn_last_error(r); /* lost: CV_ERETRY; an error reply (no WAIT here): CV_EREFUSED */
    long long got = rep->type == REDIS_REPLY_INTEGER ? rep->integer : -1;
    freeReplyObject(rep);
    if (got >= cfg->redis_wait_replicas) return 0;
    return broker_fail(&r->base, CV_ERETRY,
                       "redis %s: %lld of the %d replica%s redis.wait_replicas asks for had it within %d ms: not "
                       "confirmed", what, got, cfg->redis_wait_replicas, cfg->redis_wait_replicas == 1 ? "" : "s",
                       cfg->redis_wait_timeout_ms);
}

/* A new connection for cfg (redis_internal.h). */
struct redis_broker *redis_conn_open(const struct cfg *cfg, int *cls, char *err, size_t errlen) {
    struct redis_broker *r = calloc(1, sizeof *r);
    if (!r) {
        snprintf(err, errlen, "out of memory");
        *cls = CV_ERETRY;
        return NULL;
    }
    r->base.cfg = cfg;
    char why[512];
    if (parse_url(r, cfg->redis_url, why, sizeof why) < 0) {
        snprintf(err, errlen, "bad Redis URL: %s", why);
        *cls = CV_ECONFIG;
        free(r);
        return NULL;
    }
    if ((*cls = redis_conn_connect(r)) < 0) {
        snprintf(err, errlen, "%s", r->base.err);
        redis_conn_close(r);
        return NULL;
    }
    return r;
}

/* broker_note BROKER_IDLE, the connection dropped, r freed. */
void redis_conn_close(struct redis_broker *r) {
    if (!r) return;
    broker_note(BROKER_IDLE, 0);
    redis_conn_drop(r);
    free(r);
}
