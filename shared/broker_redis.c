/* broker_redis.c - the Redis backend (hiredis): lists for queues, a stream for events.
 *
 * Keys (prefix "conveyor"): queue list conveyor:queue:<q> (producers LPUSH, workers
 * BLMOVE RIGHT->LEFT into conveyor:inflight:<q>:<workerId>), dead letters
 * conveyor:dead:<q>, events stream conveyor:events.
 * A message that goes back to its queue after it was taken (a dead worker's,
 * a requeued one, a due retry) is also added to the set conveyor:returned:<q>;
 * whoever takes it next removes it from there and knows it was delivered before.
 * A broken connection is dropped and re-opened by the next call.
 *
 * Liveness. A consuming worker keeps conveyor:worker:<workerId> (its pid, EX
 * heartbeat_ttl); the reaper returns the in-flight list of a worker whose key has
 * expired. The key is refreshed every heartbeat_interval by a thread of the worker
 * (vouch_main), with a Redis connection of its own, not between takes: a batch
 * that runs longer than heartbeat_ttl (a slow lock, many password hashes) keeps
 * its messages. Why a thread in the worker and not the supervisor vouching for its
 * live children: the thread dies with its process (kill -9, OOM: the key expires
 * as before), and it goes on vouching while its worker drains after the
 * supervisor was killed -9 (children get SIGTERM from PR_SET_PDEATHSIG and finish
 * the batch in hand; a supervisor that vouched would stop, and another pool's
 * reaper would hand that batch out while it still ran). It blocks nothing: the
 * worker never waits for it, and the supervisor's loop needs no Redis.
 * A worker stuck for ever must not be vouched for for ever: the thread refreshes
 * only while the worker makes progress, that is, made a call to its broker (noted
 * as the call starts: a Redis command is bounded by its reply timeout, broker.reply_timeout_ms plus its block time) or had a
 * result from PostgreSQL (liveness_watch_db: every result, an error too) within
 * the longest a working worker can go without one: a statement
 * (statement_timeout_ms), a pause inside a transaction (idle_in_transaction_
 * timeout_ms: PostgreSQL then ends the session), a Redis command (its reply timeout
 * timeout), whichever is longest, plus heartbeat_ttl. Past that it stops, logs
 * it, and the key expires: a worker stuck outside the database (or waiting for a
 * database that is away, when it holds nothing unsettled) loses its in-flight
 * messages to the reaper, and its transaction, if one is open, is ended by
 * PostgreSQL, so a copy handed out is not applied twice. The worker's own
 * refresh before each take stays, for the first take and for a thread that
 * cannot refresh.
 *
 * A silent server (a primary or Sentinel frozen with its connections open) is
 * found by socket timeouts on every read and write: broker.reply_timeout_ms (T)
 * for a command, T plus its block time for a blocking one (BLMOVE, WAIT, XREAD
 * BLOCK: set_io_timeout), 1 s for a Sentinel's answer. One that fires says so
 * (broker_note BROKER_SILENT) and drops the connection; the next command asks
 * the Sentinels again, who name the new primary once they failed over
 * (down-after-milliseconds, docs/scaling.md).
 */
#include "broker_backend.h"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <signal.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct redis_broker {
    struct broker base;
    redisContext *ctx;
    char host[256];           /* the server: the URL's, or with Sentinels the primary they named */
    int port;
    struct redis_url url;     /* as parsed: user, password, db, Sentinels */
    int sentinel_at;          /* the Sentinel asked first (the one that answered last) */
    bool refused;             /* the last connection failed on what the URL says (CV_ECONFIG) */
    char queue_key[256], inflight_key[512], dead_key[256], retry_key[256], returned_key[256], events_key[256];
    char heartbeat_key[512];  /* conveyor:worker:<workerId>, set while consuming */
    bool recover;             /* return the in-flight list before the next BLMOVE */
    int io_timeout_ms;        /* the socket timeout set on ctx now (set_io_timeout) */
    int64_t replied_ms;       /* monotonic ms of the last reply on ctx (ready probes a connection idle since long) */
    int block_ms;             /* the block time of the next command (block_next), 0 when it does not block */
    _Atomic int64_t heartbeat_at; /* monotonic ms of the last refresh (by the worker or vouch_main) */
    struct vouch *vouch;      /* the heartbeat thread while consuming, or NULL */
    struct held_ack { char *body; size_t len; } *held; /* acked batches not yet removed */
    int nheld, held_cap;
    /* subscription */
    char *pattern;
    char last_id[64];
    char **pending;       /* events read but not yet returned */
    int npending, ipending;
};

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
 * address of the primary of the URL's master name, into r->host and r->port.
 * Returns 0, or CV_ERETRY with the reason in r->base.err (no Sentinel reached
 * or none knows the master: a failover may be under way). */
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

static void drop(struct redis_broker *r);

/* Sets the socket timeout of every read and write on r->ctx to
 * broker.reply_timeout_ms plus block_ms (the server may rightly keep a blocking
 * command's reply that long), unless it is set so already. */
static void set_io_timeout(struct redis_broker *r, int block_ms) {
    int ms = r->base.cfg->broker_reply_timeout_ms + (block_ms > 0 ? block_ms : 0);
    if (!r->ctx || r->io_timeout_ms == ms) return;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    if (redisSetTimeout(r->ctx, tv) == REDIS_OK) r->io_timeout_ms = ms;
}

/* The next command (cmd, argv_cmd) blocks up to ms on the server: its reply may take that much longer. */
static void block_next(struct redis_broker *r, int ms) { r->block_ms = ms; }

/* A command is sent: its socket timeout set (set_io_timeout, with the block
 * time block_next gave, which it consumes), and the wait noted (broker_note). */
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

static int connect_now(struct redis_broker *r);

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
static int ready(struct redis_broker *r) {
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
            drop(r);
        }
    }
    if (!r->ctx) return connect_now(r);
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
    drop(r);
    return CV_ERETRY;
}

static void drop(struct redis_broker *r) {
    if (r->ctx) redisFree(r->ctx);
    r->ctx = NULL;
    r->io_timeout_ms = 0;
    r->recover = r->inflight_key[0] != '\0'; /* a BLMOVE's reply may have been lost */
}

/* A reply, or NULL with the broker error set (the connection is dropped). */
static redisReply *cmd(struct redis_broker *r, const char *fmt, ...);

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
    if (rc < 0) drop(r);
    return rc;
}

static int connect_now(struct redis_broker *r) {
    if (r->ctx && !r->ctx->err) return 0;
    drop(r);
    r->refused = false;
    int asked = r->url.nsentinels ? ask_sentinels(r) : 0;
    if (asked < 0) return asked;
    struct timeval tv = {3, 0};
    r->ctx = redisConnectWithTimeout(r->host, r->port, tv);
    if (!r->ctx || r->ctx->err) {
        broker_fail(&r->base, CV_ERETRY, "redis %s:%d: %s", r->host, r->port,
                    r->ctx ? r->ctx->errstr : "out of memory");
        drop(r);
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
        drop(r);
        return CV_ERETRY;
    }
    return broker_fail(&r->base, CV_EREFUSED, "redis %s: %s", what, rep->str);
}

/* rep, or NULL with the broker error set when there is none (the connection
 * is dropped) or it is an error (freed). */
static redisReply *checked(struct redis_broker *r, redisReply *rep) {
    if (!rep) {
        no_reply(r, "command");
        drop(r);
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
    if (ready(r) < 0) {
        r->block_ms = 0;
        return NULL;
    }
    before_command(r);
    return checked(r, redisvCommand(r->ctx, fmt, ap));
}

static redisReply *cmd(struct redis_broker *r, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = vcmd(r, fmt, ap);
    va_end(ap);
    return rep;
}

/* As cmd, with the arguments as an array. */
static redisReply *argv_cmd(struct redis_broker *r, int argc, const char **argv, const size_t *argl) {
    if (ready(r) < 0) {
        r->block_ms = 0;
        return NULL;
    }
    before_command(r);
    return checked(r, redisCommandArgv(r->ctx, argc, argv, argl));
}

/* The class of the last failure: lost connection (retry) or a refused command. */
static int last_error(struct redis_broker *r) { return r->ctx ? CV_EREFUSED : r->refused ? CV_ECONFIG : CV_ERETRY; }

static int send_held_acks(struct redis_broker *r);
static void forget_held_acks(struct redis_broker *r);

static void vouch_stop(struct redis_broker *r);

static void redis_close(struct broker *b) {
    struct redis_broker *r = (struct redis_broker *)b;
    broker_note(BROKER_IDLE, 0);
    vouch_stop(r); /* before the DEL: it would set the key again */
    if (r->nheld && send_held_acks(r) < 0)
        log_warn("%d acked message%s stay in %s (%s): handed out again, they are found done", r->nheld,
                 r->nheld == 1 ? "" : "s", r->inflight_key, r->base.err);
    forget_held_acks(r);
    free(r->held);
    if (r->heartbeat_key[0] && r->ctx) {
        /* a clean stop: nothing unsettled is in flight (or only what is done
         * already), so no reaper needs to wait for the expiry */
        redisReply *rep = cmd(r, "DEL %s", r->heartbeat_key);
        if (rep) freeReplyObject(rep);
    }
    drop(r);
    for (int i = r->ipending; i < r->npending; i++) free(r->pending[i]);
    free(r->pending);
    free(r->pattern);
    free(r);
}

static int redis_declare(struct broker *b) { (void)b; return 0; }

static int read_replies(struct redis_broker *r, int n, const char *what);
static int wait_replicas(struct redis_broker *r, const char *what);

static int redis_publish_commands(struct broker *b, const struct outgoing_command *c, int n) {
    struct redis_broker *r = (struct redis_broker *)b;
    if (ready(r) < 0) return CV_ERETRY;
    char key[256];
    for (int i = 0; i < n; i++) {
        names_redis(b->cfg, "queue", c[i].q->name, key, sizeof key);
        redisAppendCommand(r->ctx, "LPUSH %s %b", key, c[i].body, c[i].len);
    }
    int rc = read_replies(r, n, "LPUSH");
    return rc < 0 ? rc : wait_replicas(r, "LPUSH");
}

/* ---- liveness: the heartbeat thread (see the header comment) ---------------------------- */

struct vouch {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;       /* signalled by vouch_stop */
    bool stop;                 /* under lock */
    struct redis_broker *owner; /* its key and config; heartbeat_at is written by both threads */
    int64_t stall_limit_ms;    /* no progress for longer than this: stop refreshing */
};

/* Sets the owner's heartbeat key over *conn (opened here when NULL; on failure
 * it stays closed or is re-opened by the next command). Returns 0, or the class
 * of the failure with why in err: the class of the open (broker_redis_open), or
 * CV_ERETRY when the SET failed. The caller treats every class alike: one more
 * failed refresh, tried again at the next interval (a refusal ends the worker
 * through its own connection). */
static int vouch_refresh(struct vouch *v, struct broker **conn, char *err, size_t errlen) {
    const struct cfg *cfg = v->owner->base.cfg;
    int cls = CV_ERETRY;
    if (!*conn && !(*conn = broker_redis_open(cfg, &cls, err, errlen))) return cls < 0 ? cls : CV_ERETRY;
    redisReply *rep = cmd((struct redis_broker *)*conn, "SET %s %d EX %d", v->owner->heartbeat_key, (int)getpid(),
                          cfg->heartbeat_ttl_s);
    if (!rep) {
        snprintf(err, errlen, "%s", (*conn)->err);
        return CV_ERETRY;
    }
    freeReplyObject(rep);
    atomic_store(&v->owner->heartbeat_at, clock_mono_ms());
    return 0;
}

/* The thread: every heartbeat_interval, refreshes the key while the worker makes
 * progress; logs once when it stops (no progress) and once when it cannot. */
static void *vouch_main(void *arg) {
    struct vouch *v = arg;
    const struct cfg *cfg = v->owner->base.cfg;
    struct broker *conn = NULL;
    bool stalled = false, failing = false;
    char err[512];
    pthread_mutex_lock(&v->lock);
    while (!v->stop) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += cfg->heartbeat_interval_s;
        while (!v->stop && pthread_cond_timedwait(&v->wake, &v->lock, &until) == 0) {}
        if (v->stop) break;
        pthread_mutex_unlock(&v->lock);
        int64_t idle = clock_mono_ms() - liveness_progress_at_ms();
        if (idle > v->stall_limit_ms) {
            if (!stalled)
                log_warn("no progress for %lld s (no broker reply, no database result): no longer refreshing %s; "
                         "what it holds in flight goes back to the queue when the key expires",
                         (long long)idle / 1000, v->owner->heartbeat_key);
            stalled = true;
        } else {
            if (stalled) log_info("progress again: refreshing %s", v->owner->heartbeat_key);
            stalled = false;
            if (vouch_refresh(v, &conn, err, sizeof err) < 0) {
                if (!failing) log_warn("cannot refresh %s: %s; retrying", v->owner->heartbeat_key, err);
                failing = true;
            } else if (failing) {
                log_info("refreshing %s again", v->owner->heartbeat_key);
                failing = false;
            }
        }
        pthread_mutex_lock(&v->lock);
    }
    pthread_mutex_unlock(&v->lock);
    broker_close(conn);
    return NULL;
}

/* Starts the heartbeat thread of a consuming worker (with every signal blocked:
 * they go to the worker's own thread). On failure the worker refreshes the key
 * only between takes, as it always does when one is due, and says so. */
static void vouch_start(struct redis_broker *r, const struct cfg_queue *q) {
    if (r->vouch) return;
    struct vouch *v = xcalloc(1, sizeof *v);
    v->owner = r;
    /* a Redis command: the reply timeout, plus the longest block (WAIT, BLMOVE) */
    const struct cfg *cfg = r->base.cfg;
    int64_t block = cfg->redis_wait_timeout_ms > cfg->heartbeat_interval_s * 500 ? cfg->redis_wait_timeout_ms
                                                                                 : cfg->heartbeat_interval_s * 500;
    int64_t longest = cfg->broker_reply_timeout_ms + block;
    if (q->statement_timeout_ms > longest) longest = q->statement_timeout_ms;
    if (q->idle_in_transaction_timeout_ms > longest) longest = q->idle_in_transaction_timeout_ms;
    v->stall_limit_ms = longest + r->base.cfg->heartbeat_ttl_s * 1000L;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&v->wake, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&v->lock, NULL);
    liveness_progress();
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&v->thread, NULL, vouch_main, v);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        log_warn("no heartbeat thread (%s): the heartbeat is refreshed between takes only", strerror(rc));
        pthread_cond_destroy(&v->wake);
        pthread_mutex_destroy(&v->lock);
        free(v);
        return;
    }
    r->vouch = v;
}

/* Stops and joins the heartbeat thread, if any (it ends within one Redis command). */
static void vouch_stop(struct redis_broker *r) {
    struct vouch *v = r->vouch;
    if (!v) return;
    pthread_mutex_lock(&v->lock);
    v->stop = true;
    pthread_cond_signal(&v->wake);
    pthread_mutex_unlock(&v->lock);
    pthread_join(v->thread, NULL);
    pthread_cond_destroy(&v->wake);
    pthread_mutex_destroy(&v->lock);
    free(v);
    r->vouch = NULL;
}

static int redis_consume(struct broker *b, const struct cfg_queue *q, const char *worker_id) {
    struct redis_broker *r = (struct redis_broker *)b;
    names_redis(b->cfg, "queue", q->name, r->queue_key, sizeof r->queue_key);
    names_redis(b->cfg, "dead", q->name, r->dead_key, sizeof r->dead_key);
    names_redis(b->cfg, "retry", q->name, r->retry_key, sizeof r->retry_key);
    names_redis(b->cfg, "returned", q->name, r->returned_key, sizeof r->returned_key);
    char base[256];
    names_redis(b->cfg, "inflight", q->name, base, sizeof base);
    snprintf(r->inflight_key, sizeof r->inflight_key, "%s:%s", base, worker_id);
    names_redis(b->cfg, "worker", NULL, base, sizeof base);
    snprintf(r->heartbeat_key, sizeof r->heartbeat_key, "%s:%s", base, worker_id);
    r->heartbeat_at = 0;
    r->recover = true;
    vouch_start(r, q);
    return 0;
}

/* Returns an in-flight list (KEYS[1]) to the consuming end of its queue
 * (KEYS[2]), oldest first, marking each message returned (KEYS[3]); with
 * KEYS[4], only if that worker's liveness key has expired. Returns how many. */
static const char return_script[] =
    "if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then return 0 end "
    "local n = 0 "
    "while true do "
    "local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') "
    "if not v then return n end "
    "redis.call('SADD', KEYS[3], v) n = n + 1 end";

/* Returns to the consuming end of the queue, oldest last so that it is taken
 * first, what this worker id has in flight: left by an earlier process of the
 * id, or taken by a BLMOVE whose reply was lost with the connection. Only
 * called between messages, when the worker holds none. */
static int recover_inflight(struct redis_broker *r) {
    redisReply *rep = cmd(r, "EVAL %s 3 %s %s %s", return_script, r->inflight_key, r->queue_key, r->returned_key);
    if (!rep) return last_error(r);
    if (rep->integer > 0)
        log_warn("returned %lld in-flight message%s of %s to %s", rep->integer, rep->integer == 1 ? "" : "s",
                 r->inflight_key, r->queue_key);
    freeReplyObject(rep);
    r->recover = false;
    return 0;
}

/* Refreshes the worker's liveness key when it is due (vouch_main usually has). */
static int heartbeat(struct redis_broker *r) {
    int64_t now = clock_mono_ms();
    liveness_progress();
    if (r->heartbeat_at && now - r->heartbeat_at < r->base.cfg->heartbeat_interval_s * 1000L) return 0;
    redisReply *rep = cmd(r, "SET %s %d EX %d", r->heartbeat_key, (int)getpid(), r->base.cfg->heartbeat_ttl_s);
    if (!rep) return last_error(r);
    freeReplyObject(rep);
    r->heartbeat_at = now;
    return 0;
}

static void forget_held_acks(struct redis_broker *r) {
    for (int i = 0; i < r->nheld; i++) free(r->held[i].body);
    r->nheld = 0;
}

/* Removes the held acks' messages from the in-flight list (one pipeline).
 * Returns 0, or an error class (they stay held: removing one again is harmless). */
static int send_held_acks(struct redis_broker *r) {
    if (ready(r) < 0) return CV_ERETRY;
    for (int i = 0; i < r->nheld; i++)
        redisAppendCommand(r->ctx, "LREM %s 1 %b", r->inflight_key, r->held[i].body, r->held[i].len);
    int rc = read_replies(r, r->nheld, "LREM");
    if (rc == 0) forget_held_acks(r);
    return rc;
}

/* Before taking messages: the liveness key, the held acks (now, unless the
 * take carries them: acks_in_take), and what an earlier process left in
 * flight (after the held acks: what is done is not handed out again). */
static int before_take(struct redis_broker *r, bool acks_in_take) {
    int rc = heartbeat(r);
    if (rc == 0 && r->nheld && (r->recover || !acks_in_take)) rc = send_held_acks(r);
    if (rc == 0 && r->recover) rc = recover_inflight(r);
    return rc;
}

/* Fills d with a copy of a taken message (xmalloc: the message is taken). */
static void delivery_from(struct delivery *d, const redisReply *rep) {
    memset(d, 0, sizeof *d);
    d->body = xmalloc(rep->len + 1);
    memcpy(d->body, rep->str, rep->len);
    d->body[rep->len] = '\0';
    d->len = rep->len;
}

static int redis_next(struct broker *b, struct delivery *d, int timeout_ms) {
    struct redis_broker *r = (struct redis_broker *)b;
    memset(d, 0, sizeof *d);
    int rc = before_take(r, false); /* BLMOVE cannot carry them (a take usually did) */
    if (rc < 0) return rc;
    /* never block past the next heartbeat */
    if (timeout_ms > b->cfg->heartbeat_interval_s * 500) timeout_ms = b->cfg->heartbeat_interval_s * 500;
    char tmo[32];
    snprintf(tmo, sizeof tmo, "%.3f", timeout_ms / 1000.0);
    /* timeout 0: only a message already waiting (BLMOVE would block for ever) */
    block_next(r, timeout_ms);
    redisReply *rep = timeout_ms <= 0 ? cmd(r, "LMOVE %s %s RIGHT LEFT", r->queue_key, r->inflight_key)
                                      : cmd(r, "BLMOVE %s %s RIGHT LEFT %s", r->queue_key, r->inflight_key, tmo);
    if (!rep) return last_error(r);
    if (rep->type != REDIS_REPLY_STRING) {
        freeReplyObject(rep);
        return 0;
    }
    delivery_from(d, rep);
    freeReplyObject(rep);
    /* taken: was it returned? Not knowing (the connection broke), count it as
     * redelivered: that costs a count, never an uncounted start */
    rep = cmd(r, "SREM %s %b", r->returned_key, d->body, d->len);
    d->redelivered = !rep || rep->integer == 1;
    if (rep) freeReplyObject(rep);
    return 1;
}

/* Removes the acked messages ARGV[3..] from the in-flight list, then moves up
 * to ARGV[1] waiting messages to it, but no more than a fair share of those
 * waiting (their number divided by ARGV[2], the queue's workers, rounded up:
 * a backlog spreads over the workers), oldest first, and returns them, each
 * followed by 1 if it had been returned (KEYS[3]) or 0: one round trip and
 * one AOF write for the ack of a batch and the take of the next. */
static const char take_script[] =
    "for i = 3, #ARGV do redis.call('LREM', KEYS[2], 1, ARGV[i]) end "
    "local m = {} "
    "local marked = redis.call('EXISTS', KEYS[3]) == 1 "
    "local want = math.min(tonumber(ARGV[1]), math.ceil(redis.call('LLEN', KEYS[1]) / tonumber(ARGV[2]))) "
    "for i = 1, want do "
    "local v = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') "
    "if not v then break end "
    "m[#m + 1] = v "
    "m[#m + 1] = marked and redis.call('SREM', KEYS[3], v) or 0 end "
    "return m";

static int redis_take(struct broker *b, struct delivery *d, int max) {
    struct redis_broker *r = (struct redis_broker *)b;
    int rc = before_take(r, true);
    if (rc < 0) return rc;
    int argc = 8 + r->nheld;
    const char **argv = malloc((size_t)argc * sizeof *argv);
    size_t *argl = malloc((size_t)argc * sizeof *argl);
    if (!argv || !argl) {
        free(argv);
        free(argl);
        return broker_fail(b, CV_ERETRY, "redis: out of memory");
    }
    char smax[16], sharers[16];
    snprintf(smax, sizeof smax, "%d", max);
    snprintf(sharers, sizeof sharers, "%d", b->queue && b->queue->workers > 1 ? b->queue->workers : 1);
    const char *fixed[8] = {"EVAL", take_script, "3", r->queue_key, r->inflight_key, r->returned_key, smax, sharers};
    for (int i = 0; i < 8; i++) argv[i] = fixed[i], argl[i] = strlen(fixed[i]);
    for (int i = 0; i < r->nheld; i++) argv[8 + i] = r->held[i].body, argl[8 + i] = r->held[i].len;
    redisReply *rep = argv_cmd(r, argc, argv, argl);
    free(argv);
    free(argl);
    if (!rep) return last_error(r);
    forget_held_acks(r);
    int n = 0;
    if (rep->type == REDIS_REPLY_ARRAY)
        for (size_t i = 0; i + 1 < rep->elements && n < max; i += 2)
            if (rep->element[i]->type == REDIS_REPLY_STRING) {
                delivery_from(&d[n], rep->element[i]);
                d[n++].redelivered = rep->element[i + 1]->integer == 1;
            }
    freeReplyObject(rep);
    return n;
}

static int redis_ack(struct broker *b, const struct delivery *d) {
    struct redis_broker *r = (struct redis_broker *)b;
    liveness_progress();
    redisReply *rep = cmd(r, "LREM %s 1 %b", r->inflight_key, d->body, d->len);
    if (!rep) return last_error(r);
    freeReplyObject(rep);
    return 0;
}

/* Held until the next take, whose script removes them before it takes. */
static int redis_ack_batch(struct broker *b, const struct delivery *d, int n) {
    struct redis_broker *r = (struct redis_broker *)b;
    liveness_progress();
    if (r->nheld + n > r->held_cap) {
        int cap = r->nheld + n > 2 * r->held_cap ? r->nheld + n : 2 * r->held_cap;
        struct held_ack *held = realloc(r->held, (size_t)cap * sizeof *held);
        if (!held) return broker_fail(b, CV_ERETRY, "redis: out of memory holding acks");
        r->held = held;
        r->held_cap = cap;
    }
    for (int i = 0; i < n; i++) {
        char *copy = malloc(d[i].len ? d[i].len : 1);
        if (!copy) return broker_fail(b, CV_ERETRY, "redis: out of memory holding acks");
        memcpy(copy, d[i].body, d[i].len);
        r->held[r->nheld++] = (struct held_ack){copy, d[i].len};
    }
    return 0;
}

/* Reads the replies of n pipelined commands. Returns 0, CV_EREFUSED if Redis
 * refused one, or CV_ERETRY when the connection broke (it is then dropped). */
static int read_replies(struct redis_broker *r, int n, const char *what) {
    int rc = 0;
    for (int i = 0; i < n; i++) {
        redisReply *rep = NULL;
        if (i == 0) before_command(r);
        if (redisGetReply(r->ctx, (void **)&rep) != REDIS_OK) {
            no_reply(r, what);
            drop(r);
            return CV_ERETRY;
        }
        broker_note(BROKER_ANSWERED, 0);
    r->replied_ms = clock_mono_ms();
        if (rep->type == REDIS_REPLY_ERROR && rc == 0) rc = reply_error(r, rep, what);
        freeReplyObject(rep);
        if (!r->ctx) return CV_ERETRY; /* dropped by reply_error: the other replies went with it */
    }
    return rc;
}

/* With redis.wait_replicas: waits (WAIT) until that many replicas have what this
 * connection wrote, for at most redis.wait_timeout_ms. Returns 0, or CV_ERETRY
 * when fewer had it in time (not confirmed: the caller sends it again) or the
 * connection was lost, with the reason in r->base.err. */
static int wait_replicas(struct redis_broker *r, const char *what) {
    const struct cfg *cfg = r->base.cfg;
    if (cfg->redis_wait_replicas <= 0) return 0;
    block_next(r, cfg->redis_wait_timeout_ms);
    redisReply *rep = cmd(r, "WAIT %d %d", cfg->redis_wait_replicas, cfg->redis_wait_timeout_ms);
    if (!rep) return last_error(r); /* lost: CV_ERETRY; an error reply (no WAIT here): CV_EREFUSED */
    long long got = rep->type == REDIS_REPLY_INTEGER ? rep->integer : -1;
    freeReplyObject(rep);
    if (got >= cfg->redis_wait_replicas) return 0;
    return broker_fail(&r->base, CV_ERETRY,
                       "redis %s: %lld of the %d replica%s redis.wait_replicas asks for had it within %d ms: not "
                       "confirmed", what, got, cfg->redis_wait_replicas, cfg->redis_wait_replicas == 1 ? "" : "s",
                       cfg->redis_wait_timeout_ms);
}

/* Runs `<cmd[i]> KEYS[i] [1] ARGV[i]` for each i in order (LREM removes one
 * occurrence), stopping at the first that Redis refuses, in one script: a
 * message is copied to where it goes before it is removed from where it was,
 * so a refusal (a key of the wrong type, out of memory) never loses it. */
static const char moves_script[] =
    "for i = 1, #KEYS do "
    "local c = ARGV[2 * i - 1] "
    "if c == 'LREM' then redis.call(c, KEYS[i], 1, ARGV[2 * i]) else redis.call(c, KEYS[i], ARGV[2 * i]) end "
    "end return #KEYS";

static int transaction(struct redis_broker *r, const char *what, int n, const char **cmds, const char **keys,
                       const char **vals, const size_t *lens) {
    liveness_progress();
    if (ready(r) < 0) return CV_ERETRY;
    const char *argv[3 + 3 * 3]; /* EVAL, script, numkeys; up to 3 keys, 3 (command, value) pairs */
    size_t argl[3 + 3 * 3];
    char nkeys[8];
    snprintf(nkeys, sizeof nkeys, "%d", n);
    int k = 0;
    argv[k] = "EVAL", argl[k++] = 4;
    argv[k] = moves_script, argl[k++] = sizeof moves_script - 1;
    argv[k] = nkeys, argl[k++] = strlen(nkeys);
    for (int i = 0; i < n; i++) argv[k] = keys[i], argl[k++] = strlen(keys[i]);
    for (int i = 0; i < n; i++) {
        argv[k] = cmds[i], argl[k++] = strlen(cmds[i]);
        argv[k] = vals[i], argl[k++] = lens[i];
    }
    redisAppendCommandArgv(r->ctx, k, argv, argl);
    return read_replies(r, 1, what);
}

static int redis_requeue(struct broker *b, const struct delivery *d) {
    struct redis_broker *r = (struct redis_broker *)b;
    const char *cmds[3] = {"LPUSH", "SADD", "LREM"};
    const char *keys[3] = {r->queue_key, r->returned_key, r->inflight_key};
    const char *vals[3] = {d->body, d->body, d->body};
    size_t lens[3] = {d->len, d->len, d->len};
    return transaction(r, "requeue", 3, cmds, keys, vals, lens);
}

static int redis_dead_letter(struct broker *b, const struct delivery *d, const char *reason,
                             const char *error, int attempts, const char *dead_id) {
    (void)dead_id; /* the list is read in pages as it is: no index */
    struct redis_broker *r = (struct redis_broker *)b;
    char ts[32];
    clock_rfc3339(clock_ms(), ts);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "reason", reason);
    cJSON_AddStringToObject(o, "error", error);
    cJSON_AddNumberToObject(o, "attempts", attempts);
    cJSON_AddStringToObject(o, "failedAt", ts);
    cJSON_AddStringToObject(o, "queue", b->queue ? b->queue->name : "");
    if (utf8_valid(d->body, d->len) && !memchr(d->body, '\0', d->len)) {
        cJSON_AddStringToObject(o, "message", d->body);
    } else {
        size_t n = sodium_base64_encoded_len(d->len, sodium_base64_VARIANT_ORIGINAL);
        char *b64 = xmalloc(n);
        sodium_bin2base64(b64, n, (const unsigned char *)d->body, d->len, sodium_base64_VARIANT_ORIGINAL);
        cJSON_AddStringToObject(o, "messageBase64", b64);
        free(b64);
    }
    char *entry = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!entry) return broker_fail(b, CV_ERETRY, "redis: out of memory");
    const char *cmds[2] = {"LPUSH", "LREM"};
    const char *keys[2] = {r->dead_key, r->inflight_key};
    const char *vals[2] = {entry, d->body};
    size_t lens[2] = {strlen(entry), d->len};
    int rc = transaction(r, "dead-letter", 2, cmds, keys, vals, lens);
    free(entry);
    return rc;
}

/* ZADD KEYS[1] ARGV[1] ARGV[2], then LREM KEYS[2] 1 ARGV[2]. */
static const char retry_script[] =
    "redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]) redis.call('LREM', KEYS[2], 1, ARGV[2]) return 1";

static int redis_retry(struct broker *b, const struct delivery *d, int delay_ms) {
    struct redis_broker *r = (struct redis_broker *)b;
    liveness_progress();
    char due[32];
    snprintf(due, sizeof due, "%lld", (long long)(clock_ms() + delay_ms));
    if (!r->ctx && connect_now(r) < 0) return CV_ERETRY;
    /* into the retry set first, then out of flight: a refusal loses nothing */
    redisReply *rep = cmd(r, "EVAL %s 2 %s %s %s %b", retry_script, r->retry_key, r->inflight_key, due, d->body,
                          d->len);
    if (!rep) return last_error(r);
    freeReplyObject(rep);
    return 0;
}

/* Moves due retries (score <= now) back to the producer end of the queue, marked returned. */
static const char due_script[] =
    "local m = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 500) "
    "for _, v in ipairs(m) do redis.call('LPUSH', KEYS[2], v) redis.call('ZREM', KEYS[1], v) "
    "redis.call('SADD', KEYS[3], v) end "
    "return #m";

static int redis_maintain(struct broker *b) {
    struct redis_broker *r = (struct redis_broker *)b;
    char now[32], queue[256], retry[256], returned[256], pattern[300], worker[256], hb[600];
    snprintf(now, sizeof now, "%lld", (long long)clock_ms());
    names_redis(b->cfg, "worker", NULL, worker, sizeof worker);
    long long moved = 0;
    for (int i = 0; i < b->cfg->nqueues; i++) {
        const struct cfg_queue *q = &b->cfg->queues[i];
        if (q->transport != TRANSPORT_REDIS) continue;
        names_redis(b->cfg, "queue", q->name, queue, sizeof queue);
        names_redis(b->cfg, "retry", q->name, retry, sizeof retry);
        names_redis(b->cfg, "returned", q->name, returned, sizeof returned);
        redisReply *rep = cmd(r, "EVAL %s 3 %s %s %s %s", due_script, retry, queue, returned, now);
        if (!rep) return last_error(r);
        moved += rep->integer;
        freeReplyObject(rep);
        names_redis(b->cfg, "inflight", q->name, pattern, sizeof pattern);
        size_t plen = strlen(pattern) + 1; /* "...:inflight:<q>:" */
        strcat(pattern, ":*");
        char cursor[32] = "0";
        do {
            rep = cmd(r, "SCAN %s MATCH %s COUNT 500", cursor, pattern);
            if (!rep) return last_error(r);
            snprintf(cursor, sizeof cursor, "%s", rep->element[0]->str);
            redisReply *keys = rep->element[1];
            for (size_t k = 0; k < keys->elements; k++) {
                const char *key = keys->element[k]->str;
                snprintf(hb, sizeof hb, "%s:%s", worker, key + plen);
                redisReply *x = cmd(r, "EVAL %s 4 %s %s %s %s", return_script, key, queue, returned, hb);
                if (!x) { freeReplyObject(rep); return last_error(r); }
                if (x->integer > 0)
                    log_warn("worker %s is gone (no heartbeat): returned %lld in-flight message%s to %s",
                             key + plen, x->integer, x->integer == 1 ? "" : "s", queue);
                moved += x->integer;
                freeReplyObject(x);
            }
            freeReplyObject(rep);
        } while (strcmp(cursor, "0") != 0);
    }
    return (int)moved;
}

/* Parses one conveyor:dead:<q> entry into d; returns false if it is not ours. */
static bool parse_dead(const char *entry, struct dead_letter *d) {
    memset(d, 0, sizeof *d);
    cJSON *o = cJSON_Parse(entry);
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(o, "message");
    const cJSON *m64 = cJSON_GetObjectItemCaseSensitive(o, "messageBase64");
    if (cJSON_IsString(m)) {
        d->len = strlen(m->valuestring);
        d->body = xstrdup(m->valuestring);
    } else if (cJSON_IsString(m64)) {
        size_t cap = strlen(m64->valuestring);
        d->body = xmalloc(cap + 1);
        if (sodium_base642bin((unsigned char *)d->body, cap, m64->valuestring, cap, NULL, &d->len, NULL,
                              sodium_base64_VARIANT_ORIGINAL) != 0)
            d->len = 0;
        d->body[d->len] = '\0';
    } else {
        cJSON_Delete(o);
        return false;
    }
    const cJSON *f;
    if (cJSON_IsString(f = cJSON_GetObjectItemCaseSensitive(o, "reason"))) d->reason = xstrdup(f->valuestring);
    if (cJSON_IsString(f = cJSON_GetObjectItemCaseSensitive(o, "error"))) d->error = xstrdup(f->valuestring);
    if (cJSON_IsString(f = cJSON_GetObjectItemCaseSensitive(o, "failedAt"))) d->failed_at = xstrdup(f->valuestring);
    if (cJSON_IsNumber(f = cJSON_GetObjectItemCaseSensitive(o, "attempts"))) d->attempts = f->valueint;
    cJSON_Delete(o);
    return true;
}

/* Walks the dead letters of q oldest first; with sel, removes (and with
 * requeue re-publishes) the chosen ones; with out, collects them all. */
static int redis_dead_walk(struct broker *b, const struct cfg_queue *q, dead_select_fn sel, void *arg,
                           bool requeue, int *count, struct dead_letter **out, int *n) {
    struct redis_broker *r = (struct redis_broker *)b;
    char dead[256], queue[256];
    names_redis(r->base.cfg, "dead", q->name, dead, sizeof dead);
    names_redis(r->base.cfg, "queue", q->name, queue, sizeof queue);
    redisReply *rep = cmd(r, "LRANGE %s 0 -1", dead);
    if (!rep) return last_error(r);
    if (out) *out = xcalloc(rep->elements ? rep->elements : 1, sizeof **out);
    int rc = 0, index = 0;
    for (size_t i = rep->elements; i-- > 0 && rc == 0;) {  /* LPUSHed: the oldest is last */
        redisReply *e = rep->element[i];
        struct dead_letter d;
        if (!parse_dead(e->str, &d)) continue;
        index++;
        if (sel && sel(&d, index, arg)) {
            /* retry: onto the queue first, then out of the dead letters */
            const char *cmds[2] = {requeue ? "LPUSH" : "LREM", "LREM"};
            const char *keys[2] = {requeue ? queue : dead, dead};
            const char *vals[2] = {requeue ? d.body : e->str, e->str};
            size_t lens[2] = {requeue ? d.len : e->len, e->len};
            rc = transaction(r, requeue ? "dead-letter retry" : "dead-letter purge", requeue ? 2 : 1, cmds, keys,
                             vals, lens);
            if (rc == 0) (*count)++;
        }
        if (out) (*out)[(*n)++] = d;
        else dead_letter_clear(&d);
    }
    freeReplyObject(rep);
    return rc;
}

/* Up to limit dead letters of q after the offset oldest, oldest first: one
 * LRANGE counted from the list's old end (the right: entries are LPUSHed), so
 * its cost is the page's, whatever the list's length; nothing moves. An entry
 * that is not a dead letter's JSON is left out of *out. */
static int redis_dead_page(struct broker *b, const struct cfg_queue *q, long offset, int limit,
                           struct dead_letter **out, int *n) {
    struct redis_broker *r = (struct redis_broker *)b;
    char dead[256];
    names_redis(r->base.cfg, "dead", q->name, dead, sizeof dead);
    redisReply *rep = cmd(r, "LRANGE %s %ld %ld", dead, -(offset + limit), -(offset + 1));
    if (!rep) return last_error(r);
    *out = xcalloc(rep->elements ? rep->elements : 1, sizeof **out);
    for (size_t i = rep->elements; i-- > 0;) /* the range comes newest first */
        if (parse_dead(rep->element[i]->str, &(*out)[*n])) (*n)++;
    freeReplyObject(rep);
    return 0;
}

/* The integer reply of a command on key (LLEN, ZCARD) into *n. Returns 0 or a class. */
static int key_count(struct redis_broker *r, const char *command, const char *key, long *n) {
    redisReply *rep = cmd(r, "%s %s", command, key);
    if (!rep) return last_error(r);
    *n = (long)rep->integer;
    freeReplyObject(rep);
    return 0;
}

/* LLEN of the dead letters of q. */
static int redis_dead_count(struct broker *b, const struct cfg_queue *q, long *n) {
    char key[256];
    names_redis(b->cfg, "dead", q->name, key, sizeof key);
    return key_count((struct redis_broker *)b, "LLEN", key, n);
}

/* LLEN of the queue and of its dead letters, ZCARD of its retry set, and the
 * LLEN of every worker's in-flight list of it (found with SCAN). */
static int redis_queue_counts(struct broker *b, const struct cfg_queue *q, struct queue_counts *out) {
    struct redis_broker *r = (struct redis_broker *)b;
    char key[256], pattern[300];
    names_redis(b->cfg, "queue", q->name, key, sizeof key);
    int rc = key_count(r, "LLEN", key, &out->waiting);
    names_redis(b->cfg, "dead", q->name, key, sizeof key);
    if (rc == 0) rc = key_count(r, "LLEN", key, &out->dead);
    names_redis(b->cfg, "retry", q->name, key, sizeof key);
    if (rc == 0) rc = key_count(r, "ZCARD", key, &out->retrying);
    if (rc < 0) return rc;
    out->in_flight = 0;
    names_redis(b->cfg, "inflight", q->name, pattern, sizeof pattern);
    strcat(pattern, ":*");
    char cursor[32] = "0";
    do {
        redisReply *rep = cmd(r, "SCAN %s MATCH %s COUNT 500", cursor, pattern);
        if (!rep) return last_error(r);
        snprintf(cursor, sizeof cursor, "%s", rep->element[0]->str);
        redisReply *keys = rep->element[1];
        for (size_t k = 0; k < keys->elements && rc == 0; k++) {
            long n = 0;
            if ((rc = key_count(r, "LLEN", keys->element[k]->str, &n)) == 0) out->in_flight += n;
        }
        freeReplyObject(rep);
    } while (rc == 0 && strcmp(cursor, "0") != 0);
    return rc;
}

static int redis_publish_events(struct broker *b, const struct outgoing_event *ev, int n) {
    struct redis_broker *r = (struct redis_broker *)b;
    if (ready(r) < 0) return CV_ERETRY;
    char maxlen[32];
    snprintf(maxlen, sizeof maxlen, "%ld", b->cfg->events_maxlen);
    for (int i = 0; i < n; i++)
        redisAppendCommand(r->ctx, "XADD %s MAXLEN ~ %s * type %s event %s", r->events_key, maxlen,
                           ev[i].type, ev[i].json);
    int rc = read_replies(r, n, "XADD");
    return rc < 0 ? rc : wait_replicas(r, "XADD");
}

static int redis_subscribe(struct broker *b, const char *pattern) {
    struct redis_broker *r = (struct redis_broker *)b;
    free(r->pattern);
    r->pattern = xstrdup(pattern ? pattern : "#");
    redisReply *rep = cmd(r, "XREVRANGE %s + - COUNT 1", r->events_key);
    if (!rep) return last_error(r);
    snprintf(r->last_id, sizeof r->last_id, "0-0");
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 && rep->element[0]->elements == 2)
        snprintf(r->last_id, sizeof r->last_id, "%s", rep->element[0]->element[0]->str);
    freeReplyObject(rep);
    return 0;
}

static int redis_next_event(struct broker *b, char **json, int timeout_ms) {
    struct redis_broker *r = (struct redis_broker *)b;
    int64_t deadline = clock_mono_ms() + timeout_ms;
    for (;;) {
        while (r->ipending < r->npending) {
            char *e = r->pending[r->ipending++];
            cJSON *o = cJSON_Parse(e);
            const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "type");
            bool match = cJSON_IsString(t) && topic_match(r->pattern, t->valuestring);
            cJSON_Delete(o);
            if (match) { *json = e; return 1; }
            free(e);
        }
        r->npending = r->ipending = 0;
        int64_t left = deadline - clock_mono_ms();
        if (left <= 0) return 0;
        block_next(r, (int)left);
        redisReply *rep = cmd(r, "XREAD COUNT 256 BLOCK %lld STREAMS %s %s", (long long)left,
                              r->events_key, r->last_id);
        if (!rep) return last_error(r);
        if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 1) {
            redisReply *entries = rep->element[0]->element[1];
            free(r->pending);
            r->pending = xcalloc(entries->elements ? entries->elements : 1, sizeof *r->pending);
            for (size_t i = 0; i < entries->elements; i++) {
                redisReply *en = entries->element[i];
                snprintf(r->last_id, sizeof r->last_id, "%s", en->element[0]->str);
                redisReply *fields = en->element[1];
                for (size_t f = 0; f + 1 < fields->elements; f += 2)
                    if (strcmp(fields->element[f]->str, "event") == 0)
                        r->pending[r->npending++] = xstrdup(fields->element[f + 1]->str);
            }
        }
        freeReplyObject(rep);
    }
}

static const struct broker_ops redis_ops = {
    .close = redis_close,
    .declare = redis_declare,
    .publish_commands = redis_publish_commands,
    .consume = redis_consume,
    .next = redis_next,
    .take = redis_take,
    .ack = redis_ack,
    .ack_batch = redis_ack_batch,
    .requeue = redis_requeue,
    .dead_letter = redis_dead_letter,
    .retry = redis_retry,
    .maintain = redis_maintain,
    .dead_walk = redis_dead_walk,
    .dead_page = redis_dead_page,
    .dead_count = redis_dead_count,
    .queue_counts = redis_queue_counts,
    .publish_events = redis_publish_events,
    .subscribe = redis_subscribe,
    .next_event = redis_next_event,
};

struct broker *broker_redis_open(const struct cfg *cfg, int *cls, char *err, size_t errlen) {
    struct redis_broker *r = calloc(1, sizeof *r);
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    r->base.ops = &redis_ops;
    r->base.cfg = cfg;
    names_redis(cfg, "events", NULL, r->events_key, sizeof r->events_key);
    char why[512];
    if (parse_url(r, cfg->redis_url, why, sizeof why) < 0) {
        snprintf(err, errlen, "bad Redis URL: %s", why);
        *cls = CV_ECONFIG;
        free(r);
        return NULL;
    }
    if ((*cls = connect_now(r)) < 0) {
        snprintf(err, errlen, "%s", r->base.err);
        redis_close(&r->base);
        return NULL;
    }
    return &r->base;
}
