/* broker_redis.c - the Redis backend (hiredis): lists for queues, a stream for
 * events. Here are its operations (the table of struct broker_ops) and
 * broker_redis_open; the connection is redis_conn.c, the worker's liveness key
 * redis_heartbeat.c, the Lua scripts redis_scripts.c (redis_internal.h).
 *
 * Keys (prefix "conveyor"): queue list conveyor:queue:<q> (producers LPUSH, workers
 * BLMOVE RIGHT->LEFT into conveyor:inflight:<q>:<workerId>), dead letters
 * conveyor:dead:<q>, events stream conveyor:events.
 * A message that goes back to its queue after it was taken (a dead worker's,
 * a requeued one, a due retry) is also added to the set conveyor:returned:<q>;
 * whoever takes it next removes it from there and knows it was delivered before.
 * A broken connection is dropped and re-opened by the next call.
 *
 * A laned queue (q->lanes >= 2; docs/contract.md, "Lanes") keeps the queue's
 * list as its intake: its take script (redis_script_lane_take) sorts the
 * intake into the lane lists conveyor:queue:<q>:lane:<class>:<i> and takes
 * from those; ordered, a lane is one worker's at a time (its owner key
 * conveyor:laneowner:<q>:<class>:<i>, named in the worker's set
 * conveyor:laneowned:<q>:<workerId>) until that worker holds nothing in flight.
 * Everything that puts a laned message back puts it at the head (consuming
 * end) of its lane; a retry comes back through the intake.
 */
#include "redis_internal.h"

#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int send_held_acks(struct redis_broker *r);
static void forget_held_acks(struct redis_broker *r);

/* Laned queues: how many commands a take sorts from the intake at most, so
 * that one script never runs long (about 1 ms for 1000 small commands). */
#define LANE_SORT_MAX 1000
/* broker_next on a laned queue polls the take script (no BLMOVE can wait on
 * several lists and sort): first after 5 ms, then twice as long, at most 100 ms. */
#define LANE_POLL_FIRST_MS 5
#define LANE_POLL_MAX_MS 100

/* Arguments of a script (EVAL ...) built up one at a time: borrowed strings
 * and their lengths. Small: xrealloc, no error path. */
struct args {
    const char **v;
    size_t *l;
    int n, cap;
};

/* Appends s (len bytes, borrowed until the command is sent). */
static void args_add(struct args *a, const char *s, size_t len) {
    if (a->n == a->cap) {
        a->cap = a->cap ? 2 * a->cap : 32;
        a->v = xrealloc(a->v, (size_t)a->cap * sizeof *a->v);
        a->l = xrealloc(a->l, (size_t)a->cap * sizeof *a->l);
    }
    a->v[a->n] = s;
    a->l[a->n++] = len;
}

static void args_addz(struct args *a, const char *s) { args_add(a, s, strlen(s)); }

/* Frees the arrays (not the strings, which are borrowed). */
static void args_free(struct args *a) {
    free(a->v);
    free(a->l);
    *a = (struct args){0};
}

/* A laned queue's type -> aggregate field map, as its scripts take it (ROUTE
 * in redis_scripts.c): how many pairs, then each (type, field) of a type that
 * has a field. The strings are borrowed from the cfg. */
struct lane_args {
    char count[16];
    struct args pairs;
};

/* The map of q (lane_args_free frees it). Cannot fail. */
static struct lane_args *lane_args_new(const struct cfg_queue *q) {
    struct lane_args *la = xcalloc(1, sizeof *la);
    int n = 0;
    for (int j = 0; q->order_fields && j < q->ncommands; j++)
        if (q->order_fields[j]) {
            args_addz(&la->pairs, q->commands[j]);
            args_addz(&la->pairs, q->order_fields[j]);
            n++;
        }
    snprintf(la->count, sizeof la->count, "%d", n);
    return la;
}

/* NULL is a no-op. */
static void lane_args_free(struct lane_args *la) {
    if (!la) return;
    args_free(&la->pairs);
    free(la);
}

/* Appends la to a: the count, then the pairs. */
static void args_add_route(struct args *a, const struct lane_args *la) {
    args_addz(a, la->count);
    for (int i = 0; i < la->pairs.n; i++) args_add(a, la->pairs.v[i], la->pairs.l[i]);
}

/* A laned queue's key prefixes: the lanes' (<prefix>:queue:<q>:lane:), the
 * owner keys' (<prefix>:laneowner:<q>:, "" unless ordered) and the owned set
 * of worker_id (<prefix>:laneowned:<q>:<workerId>). */
static void lane_names(const struct cfg *cfg, const struct cfg_queue *q, const char *worker_id, char lanes[300],
                       char owners[300], char owned[600]) {
    char base[256];
    names_redis(cfg, "queue", q->name, base, sizeof base);
    snprintf(lanes, 300, "%s:lane:", base);
    names_redis(cfg, "laneowner", q->name, base, sizeof base);
    if (q->ordered) snprintf(owners, 300, "%s:", base);
    else owners[0] = '\0';
    names_redis(cfg, "laneowned", q->name, base, sizeof base);
    snprintf(owned, 600, "%s:%s", base, worker_id);
}

/* Runs the script built in a (its reply: the caller frees it), then frees a.
 * NULL as redis_conn_argv_cmd. */
static redisReply *args_run(struct redis_broker *r, struct args *a) {
    redisReply *rep = redis_conn_argv_cmd(r, a->n, a->v, a->l);
    args_free(a);
    return rep;
}

static void redis_close(struct broker *b) {
    struct redis_broker *r = (struct redis_broker *)b;
    broker_note(BROKER_IDLE, 0);
    redis_heartbeat_stop(r); /* before the DEL: it would set the key again */
    if (r->nheld && send_held_acks(r) < 0)
        log_warn("%d acked message%s stay in %s (%s): handed out again, they are found done", r->nheld,
                 r->nheld == 1 ? "" : "s", r->inflight_key, r->base.err);
    forget_held_acks(r);
    free(r->held);
    lane_args_free(r->route);
    free(r->sub); /* what a subscription's attach kept (redis_subscription.c) */
    if (r->heartbeat_key[0] && r->ctx) {
        /* a clean stop: nothing unsettled is in flight (or only what is done
         * already), so no reaper needs to wait for the expiry */
        redisReply *rep = redis_conn_cmd(r, "DEL %s", r->heartbeat_key);
        if (rep) freeReplyObject(rep);
    }
    redis_conn_drop(r);
    for (int i = r->ipending; i < r->npending; i++) free(r->pending[i]);
    free(r->pending);
    free(r->pattern);
    free(r);
}

static int redis_declare(struct broker *b) { (void)b; return 0; }

/* Each command LPUSHed, in one pipeline; to a bounded queue (max_length)
 * through redis_script_bounded_push, which refuses it when the list is full:
 * then CV_EFULL (the others were taken), each one's *refused set. */
static int redis_publish_commands(struct broker *b, const struct outgoing_command *c, int n) {
    struct redis_broker *r = (struct redis_broker *)b;
    if (redis_conn_ready(r) < 0) return CV_ERETRY;
    long long *len = calloc((size_t)n, sizeof *len);
    if (!len) return broker_fail(b, CV_ERETRY, "redis: out of memory");
    char key[256], max[24];
    for (int i = 0; i < n; i++) {
        names_redis(b->cfg, "queue", c[i].q->name, key, sizeof key);
        snprintf(max, sizeof max, "%ld", c[i].q->max_length);
        if (c[i].q->max_length > 0 && c[i].q->lanes >= 2) /* the intake and its lanes count */
            redisAppendCommand(r->ctx, "EVAL %s 1 %s %s %b %s:lane: %d", redis_script_lane_bounded_push, key, max,
                               c[i].body, c[i].len, key, c[i].q->lanes);
        else if (c[i].q->max_length > 0)
            redisAppendCommand(r->ctx, "EVAL %s 1 %s %s %b", redis_script_bounded_push, key, max, c[i].body, c[i].len);
        else redisAppendCommand(r->ctx, "LPUSH %s %b", key, c[i].body, c[i].len);
    }
    int rc = redis_conn_read_ints(r, n, "LPUSH", len), refused = 0, first = -1;
    for (int i = 0; i < n; i++) {
        if (c[i].refused) *c[i].refused = rc == 0 && len[i] < 0;
        if (rc == 0 && len[i] < 0 && refused++ == 0) first = i;
    }
    free(len);
    if (rc == 0) rc = redis_conn_wait_replicas(r, "LPUSH");
    if (rc < 0 || !refused) return rc;
    names_redis(b->cfg, "queue", c[first].q->name, key, sizeof key);
    return broker_fail(b, CV_EFULL, "queue %s is full (max_length %ld): %d of %d commands refused", key,
                       c[first].q->max_length, refused, n);
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
    lane_args_free(r->route);
    r->route = NULL;
    r->lanes = q->lanes >= 2 ? q->lanes : 0;
    r->ordered = r->lanes && q->ordered;
    if (r->lanes) {
        lane_names(b->cfg, q, worker_id, r->lane_prefix, r->owner_prefix, r->owned_key);
        snprintf(r->worker_id, sizeof r->worker_id, "%s", worker_id);
        r->route = lane_args_new(q);
        memset(r->back, 0, sizeof r->back);
    }
    redis_heartbeat_start(r, q);
    return 0;
}

/* A laned queue's in-flight list (KEYS[1] inflight) back to the heads of its
 * lanes (redis_script_lane_return), its lanes freed; with heartbeat (not
 * NULL), only if that worker's liveness key expired. Returns the reply (the
 * caller frees it) or NULL as redis_conn_argv_cmd. */
static redisReply *lane_return(struct redis_broker *r, const struct cfg_queue *q, const char *inflight,
                               const char *returned, const char *worker_id, const char *heartbeat) {
    char lanes[300], owners[300], owned[600], n[16];
    lane_names(r->base.cfg, q, worker_id, lanes, owners, owned);
    snprintf(n, sizeof n, "%d", q->lanes);
    struct lane_args *la = lane_args_new(q);
    struct args a = {0};
    const char *const fixed[] = {"EVAL", redis_script_lane_return, heartbeat ? "4" : "3", inflight, returned, owned};
    for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++) args_addz(&a, fixed[i]);
    if (heartbeat) args_addz(&a, heartbeat);
    args_addz(&a, n);
    args_addz(&a, lanes);
    args_addz(&a, owners);
    args_addz(&a, worker_id);
    args_add_route(&a, la);
    redisReply *rep = args_run(r, &a);
    lane_args_free(la);
    return rep;
}

/* Returns to the consuming end of the queue, oldest last so that it is taken
 * first, what this worker id has in flight: left by an earlier process of the
 * id, or taken by a BLMOVE whose reply was lost with the connection. Only
 * called between messages, when the worker holds none. */
static int recover_inflight(struct redis_broker *r) {
    redisReply *rep = r->lanes ? lane_return(r, r->base.queue, r->inflight_key, r->returned_key, r->worker_id, NULL)
                               : redis_conn_cmd(r, "EVAL %s 3 %s %s %s", redis_script_return, r->inflight_key,
                                                r->queue_key, r->returned_key);
    if (!rep) return redis_conn_last_error(r);
    if (rep->integer > 0)
        log_warn("returned %lld in-flight message%s of %s to %s", rep->integer, rep->integer == 1 ? "" : "s",
                 r->inflight_key, r->queue_key);
    freeReplyObject(rep);
    r->recover = false;
    return 0;
}

static void forget_held_acks(struct redis_broker *r) {
    for (int i = 0; i < r->nheld; i++) free(r->held[i].body);
    r->nheld = 0;
}

/* Removes the held acks' messages from the in-flight list (one pipeline).
 * Returns 0, or an error class (they stay held: removing one again is harmless). */
static int send_held_acks(struct redis_broker *r) {
    if (redis_conn_ready(r) < 0) return CV_ERETRY;
    for (int i = 0; i < r->nheld; i++)
        redisAppendCommand(r->ctx, "LREM %s 1 %b", r->inflight_key, r->held[i].body, r->held[i].len);
    if (r->ordered) /* and the worker's lanes freed if that emptied its flight */
        redisAppendCommand(r->ctx, "EVAL %s 2 %s %s %s", redis_script_lane_release, r->inflight_key, r->owned_key,
                           r->worker_id);
    int rc = redis_conn_read_replies(r, r->nheld + (r->ordered ? 1 : 0), "LREM");
    if (rc == 0) forget_held_acks(r);
    return rc;
}

/* Before taking messages: the liveness key, the held acks (now, unless the
 * take carries them: acks_in_take), and what an earlier process left in
 * flight (after the held acks: what is done is not handed out again). */
static int before_take(struct redis_broker *r, bool acks_in_take) {
    int rc = redis_heartbeat_refresh(r);
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

static int redis_take(struct broker *b, struct delivery *d, int max);

/* broker_next of a laned queue: no BLMOVE can wait on several lists (nor
 * sort the intake), so it polls the take script for one message, first
 * LANE_POLL_FIRST_MS after a take that found one, then twice as long each time
 * up to LANE_POLL_MAX_MS (the pause carries over from one call to the next:
 * r->poll_ms), until timeout_ms (at most half the heartbeat interval, as
 * BLMOVE). The idle cost, measured with 4 lanes: about 20 scripts a second
 * per idle worker (these polls and the worker's own broker_take between its
 * waits), some 60 us of Redis time each: about 0.15% of a Redis core per idle
 * worker; a command that arrives in an idle queue waits up to
 * LANE_POLL_MAX_MS more than with BLMOVE. */
static int lane_next(struct redis_broker *r, struct delivery *d, int timeout_ms) {
    memset(d, 0, sizeof *d);
    if (timeout_ms > r->base.cfg->heartbeat_interval_s * 500) timeout_ms = r->base.cfg->heartbeat_interval_s * 500;
    int64_t deadline = clock_mono_ms() + timeout_ms;
    for (;;) {
        int rc = redis_take(&r->base, d, 1);
        if (rc != 0) return rc;
        int64_t left = deadline - clock_mono_ms();
        if (left <= 0) return 0;
        r->poll_ms = r->poll_ms < LANE_POLL_FIRST_MS ? LANE_POLL_FIRST_MS
                     : 2 * r->poll_ms < LANE_POLL_MAX_MS ? 2 * r->poll_ms
                                                           : LANE_POLL_MAX_MS;
        backoff_sleep(left < r->poll_ms ? (int)left : r->poll_ms, NULL);
    }
}

static int redis_next(struct broker *b, struct delivery *d, int timeout_ms) {
    struct redis_broker *r = (struct redis_broker *)b;
    if (r->lanes) return lane_next(r, d, timeout_ms);
    memset(d, 0, sizeof *d);
    int rc = before_take(r, false); /* BLMOVE cannot carry them (a take usually did) */
    if (rc < 0) return rc;
    /* never block past the next heartbeat */
    if (timeout_ms > b->cfg->heartbeat_interval_s * 500) timeout_ms = b->cfg->heartbeat_interval_s * 500;
    char tmo[32];
    snprintf(tmo, sizeof tmo, "%.3f", timeout_ms / 1000.0);
    /* timeout 0: only a message already waiting (BLMOVE would block for ever) */
    redis_conn_block_next(r, timeout_ms);
    redisReply *rep =
        timeout_ms <= 0 ? redis_conn_cmd(r, "LMOVE %s %s RIGHT LEFT", r->queue_key, r->inflight_key)
                        : redis_conn_cmd(r, "BLMOVE %s %s RIGHT LEFT %s", r->queue_key, r->inflight_key, tmo);
    if (!rep) return redis_conn_last_error(r);
    if (rep->type != REDIS_REPLY_STRING) {
        freeReplyObject(rep);
        return 0;
    }
    delivery_from(d, rep);
    freeReplyObject(rep);
    /* taken: was it returned? Not knowing (the connection broke), count it as
     * redelivered: that costs a count, never an uncounted start */
    rep = redis_conn_cmd(r, "SREM %s %b", r->returned_key, d->body, d->len);
    d->redelivered = !rep || rep->integer == 1;
    if (rep) freeReplyObject(rep);
    return 1;
}

/* The reply of a take script (message, returned flag, ...) into d, up to max,
 * and frees it; the held acks it carried are forgotten. Returns how many. */
static int take_reply(struct redis_broker *r, redisReply *rep, struct delivery *d, int max) {
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

/* A laned queue's take (redis_script_lane_take): the held acks, the intake
 * sorted (up to LANE_SORT_MAX), then up to max from the lanes, the classes
 * in lane_take_order's order for this worker's take number, its lanes from
 * the cursor (the same number). Returns how many, or the class of the failure. */
static int lane_take(struct redis_broker *r, struct delivery *d, int max) {
    const struct cfg_queue *q = r->base.queue;
    char smax[16], sharers[16], n[16], cursor[24], sort[16];
    snprintf(smax, sizeof smax, "%d", max);
    snprintf(sharers, sizeof sharers, "%d", q->workers > 1 ? q->workers : 1);
    snprintf(n, sizeof n, "%d", r->lanes);
    snprintf(cursor, sizeof cursor, "%lu", r->takes % (unsigned long)r->lanes);
    snprintf(sort, sizeof sort, "%d", LANE_SORT_MAX);
    int order[LANE_CLASSES];
    lane_take_order(r->takes, order);
    struct args a = {0};
    const char *const fixed[] = {"EVAL", redis_script_lane_take, "4", r->queue_key, r->inflight_key, r->returned_key,
                                 r->owned_key, smax, sharers, n, lane_class_name(order[0]),
                                 lane_class_name(order[1]), lane_class_name(order[2]), cursor, r->lane_prefix,
                                 r->owner_prefix, r->worker_id, sort};
    for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++) args_addz(&a, fixed[i]);
    args_add_route(&a, r->route);
    for (int i = 0; i < r->nheld; i++) args_add(&a, r->held[i].body, r->held[i].len);
    redisReply *rep = args_run(r, &a);
    if (!rep) return redis_conn_last_error(r);
    memset(r->back, 0, sizeof r->back);
    int got = take_reply(r, rep, d, max);
    if (got > 0) r->takes++, r->poll_ms = 0;
    return got;
}

/* Takes up to max waiting messages (a fair share: redis_script_take) into d,
 * the held acks removed by the same script: one round trip. Returns how many,
 * or the class of the failure (the held acks stay held). */
static int redis_take(struct broker *b, struct delivery *d, int max) {
    struct redis_broker *r = (struct redis_broker *)b;
    int rc = before_take(r, true);
    if (rc < 0) return rc;
    if (r->lanes) return lane_take(r, d, max);
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
    const char *const fixed[8] = {"EVAL", redis_script_take, "3", r->queue_key, r->inflight_key, r->returned_key,
                                  smax, sharers};
    for (int i = 0; i < 8; i++) argv[i] = fixed[i], argl[i] = strlen(fixed[i]);
    for (int i = 0; i < r->nheld; i++) argv[8 + i] = r->held[i].body, argl[8 + i] = r->held[i].len;
    redisReply *rep = redis_conn_argv_cmd(r, argc, argv, argl);
    free(argv);
    free(argl);
    if (!rep) return redis_conn_last_error(r);
    return take_reply(r, rep, d, max);
}

static int redis_ack(struct broker *b, const struct delivery *d) {
    struct redis_broker *r = (struct redis_broker *)b;
    liveness_progress();
    redisReply *rep = r->ordered ? redis_conn_cmd(r, "EVAL %s 2 %s %s %s %b", redis_script_lane_release,
                                                  r->inflight_key, r->owned_key, r->worker_id, d->body, d->len)
                                 : redis_conn_cmd(r, "LREM %s 1 %b", r->inflight_key, d->body, d->len);
    if (!rep) return redis_conn_last_error(r);
    freeReplyObject(rep);
    return 0;
}

/* Held until the next take, whose script removes them before it takes.
 * gcc 12's -fanalyzer loses a copy once it is stored at a computed index of
 * r->held and calls it leaked when a later malloc fails: a false finding (the
 * copy is held; forget_held_acks frees it), hence the pragma (gcc's only). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wanalyzer-malloc-leak"
#endif
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
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/* Runs redis_script_moves over n (command, key, value) triples: each message
 * is copied to where it goes before it is removed from where it was. Returns
 * 0, or the class of the failure (what) with the reason in r->base.err. */
static int transaction(struct redis_broker *r, const char *what, int n, const char *const *cmds,
                       const char *const *keys, const char *const *vals, const size_t *lens) {
    liveness_progress();
    if (redis_conn_ready(r) < 0) return CV_ERETRY;
    const char *argv[3 + 3 * 3]; /* EVAL, script, numkeys; up to 3 keys, 3 (command, value) pairs */
    size_t argl[3 + 3 * 3];
    char nkeys[8];
    snprintf(nkeys, sizeof nkeys, "%d", n);
    int k = 0;
    argv[k] = "EVAL", argl[k++] = 4;
    argv[k] = redis_script_moves, argl[k++] = strlen(redis_script_moves);
    argv[k] = nkeys, argl[k++] = strlen(nkeys);
    for (int i = 0; i < n; i++) argv[k] = keys[i], argl[k++] = strlen(keys[i]);
    for (int i = 0; i < n; i++) {
        argv[k] = cmds[i], argl[k++] = strlen(cmds[i]);
        argv[k] = vals[i], argl[k++] = lens[i];
    }
    redisAppendCommandArgv(r->ctx, k, argv, argl);
    return redis_conn_read_replies(r, 1, what);
}

/* An ordered laned queue, after a settle that emptied the worker's flight
 * (a dead letter, a retry): its lanes freed (redis_script_lane_release). A
 * failure is only logged: the message is settled, and the worker's next take
 * (or the reaper) frees them. */
static void lane_settled(struct redis_broker *r) {
    if (!r->ordered) return;
    redisReply *rep =
        redis_conn_cmd(r, "EVAL %s 2 %s %s %s", redis_script_lane_release, r->inflight_key, r->owned_key, r->worker_id);
    if (rep) freeReplyObject(rep);
    else log_warn("lanes of %s not freed yet (%s): its next take frees them", r->worker_id, r->base.err);
}

/* A laned message out of flight back to the head (consuming end) of its lane,
 * behind those this worker put back there since its last take
 * (redis_script_lane_back, r->back), marked returned when marked; ordered,
 * the worker's lanes freed when nothing is left in flight. Returns 0 or the
 * class of the failure (what names it). */
static int lane_back(struct redis_broker *r, const struct delivery *d, bool marked, const char *what) {
    liveness_progress();
    if (redis_conn_ready(r) < 0) return CV_ERETRY;
    char n[16], skips[LANE_CLASSES * LANES_MAX * 12] = "";
    snprintf(n, sizeof n, "%d", r->lanes);
    size_t k = 0;
    for (int i = 0; i < LANE_CLASSES * r->lanes && k + 24 < sizeof skips; i++)
        if (r->back[i]) k += (size_t)snprintf(skips + k, sizeof skips - k, "%d=%d,", i, r->back[i]);
    struct args a = {0};
    const char *const fixed[] = {"EVAL", redis_script_lane_back, "3", r->inflight_key, r->returned_key, r->owned_key};
    for (size_t i = 0; i < sizeof fixed / sizeof *fixed; i++) args_addz(&a, fixed[i]);
    args_add(&a, d->body, d->len);
    args_addz(&a, marked ? "1" : "0");
    args_addz(&a, n);
    args_addz(&a, r->lane_prefix);
    args_addz(&a, r->owner_prefix);
    args_addz(&a, r->worker_id);
    args_addz(&a, skips);
    args_add_route(&a, r->route);
    redisReply *rep = args_run(r, &a);
    if (!rep) {
        int rc = redis_conn_last_error(r);
        char why[sizeof r->base.err];
        snprintf(why, sizeof why, "%s", r->base.err);
        return broker_fail(&r->base, rc, "%s: %s", what, why);
    }
    if (rep->type == REDIS_REPLY_INTEGER && rep->integer >= 0 && rep->integer < LANE_CLASSES * r->lanes)
        r->back[rep->integer]++;
    freeReplyObject(rep);
    return 0;
}

/* Moves d from flight back to the producer end of its queue, noted in the
 * returned set first when marked (what names it in an error); a laned
 * queue's to the head of its lane (lane_back). */
static int put_back(struct redis_broker *r, const struct delivery *d, bool marked, const char *what) {
    if (r->lanes) return lane_back(r, d, marked, what);
    const char *const cmds[3] = {"SADD", "LPUSH", "LREM"};
    const char *const keys[3] = {r->returned_key, r->queue_key, r->inflight_key};
    const char *const vals[3] = {d->body, d->body, d->body};
    size_t lens[3] = {d->len, d->len, d->len};
    int from = marked ? 0 : 1;
    return transaction(r, what, 3 - from, cmds + from, keys + from, vals + from, lens + from);
}

static int redis_requeue(struct broker *b, const struct delivery *d) {
    return put_back((struct redis_broker *)b, d, true, "requeue");
}

/* As redis_requeue, marked returned only if it was taken so. */
static int redis_release(struct broker *b, const struct delivery *d) {
    return put_back((struct redis_broker *)b, d, d->redelivered, "release");
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
    const char *const cmds[2] = {"LPUSH", "LREM"};
    const char *const keys[2] = {r->dead_key, r->inflight_key};
    const char *const vals[2] = {entry, d->body};
    size_t lens[2] = {strlen(entry), d->len};
    int rc = transaction(r, "dead-letter", 2, cmds, keys, vals, lens);
    free(entry);
    if (rc == 0) lane_settled(r);
    return rc;
}

/* Into the retry set (redis_script_retry), due delay_ms from now. */
static int redis_retry(struct broker *b, const struct delivery *d, int delay_ms) {
    struct redis_broker *r = (struct redis_broker *)b;
    liveness_progress();
    char due[32];
    snprintf(due, sizeof due, "%lld", (long long)(clock_ms() + delay_ms));
    if (!r->ctx && redis_conn_connect(r) < 0) return CV_ERETRY;
    /* into the retry set first, then out of flight: a refusal loses nothing */
    redisReply *rep = redis_conn_cmd(r, "EVAL %s 2 %s %s %s %b", redis_script_retry, r->retry_key, r->inflight_key,
                                     due, d->body, d->len);
    if (!rep) return redis_conn_last_error(r);
    freeReplyObject(rep);
    lane_settled(r);
    return 0;
}

/* Calls fn(r, key, arg) for every key SCAN finds that matches pattern, until
 * fn returns a class. Returns 0, fn's class, or the class of the SCAN's failure. */
static int scan_keys(struct redis_broker *r, const char *pattern,
                     int (*fn)(struct redis_broker *r, const char *key, void *arg), void *arg) {
    char cursor[32] = "0";
    int rc = 0;
    do {
        redisReply *rep = redis_conn_cmd(r, "SCAN %s MATCH %s COUNT 500", cursor, pattern);
        if (!rep) return redis_conn_last_error(r);
        snprintf(cursor, sizeof cursor, "%s", rep->element[0]->str);
        redisReply *keys = rep->element[1];
        for (size_t k = 0; k < keys->elements && rc == 0; k++) rc = fn(r, keys->element[k]->str, arg);
        freeReplyObject(rep);
    } while (rc == 0 && strcmp(cursor, "0") != 0);
    return rc;
}

/* What reap_one needs: the queue, its keys, where a key's worker id starts. */
struct reap {
    const struct cfg_queue *q;
    size_t plen;
    char queue[256], returned[256], worker[256], inflight[256];
    long long moved;
};

/* The worker whose key (an in-flight list or an owned set) is key, if its
 * liveness key expired: its in-flight list returned (a laned queue's to its
 * lanes, lane_return, its lanes freed). Returns 0 or the class of the failure. */
static int reap_one(struct redis_broker *r, const char *key, void *arg) {
    struct reap *rp = arg;
    const char *id = key + rp->plen;
    char hb[600], inflight[600];
    snprintf(hb, sizeof hb, "%s:%s", rp->worker, id);
    snprintf(inflight, sizeof inflight, "%s:%s", rp->inflight, id);
    redisReply *x = rp->q->lanes >= 2 ? lane_return(r, rp->q, inflight, rp->returned, id, hb)
                                      : redis_conn_cmd(r, "EVAL %s 4 %s %s %s %s", redis_script_return, inflight,
                                                       rp->queue, rp->returned, hb);
    if (!x) return redis_conn_last_error(r);
    if (x->integer > 0)
        log_warn("worker %s is gone (no heartbeat): returned %lld in-flight message%s to %s%s", id, x->integer,
                 x->integer == 1 ? "" : "s", rp->queue, rp->q->lanes >= 2 ? "'s lanes" : "");
    rp->moved += x->integer;
    freeReplyObject(x);
    return 0;
}

/* The workers of q named by the keys SCAN finds for kind ("inflight", or
 * "laneowned" for an ordered laned queue: <prefix>:<kind>:<q>:<workerId>)
 * whose liveness key expired (reap_one). Adds to *moved how many messages
 * moved. Returns 0 or the class of the failure. */
static int reap(struct redis_broker *r, const struct cfg_queue *q, const char *kind, long long *moved) {
    struct reap rp = {.q = q};
    char pattern[300];
    names_redis(r->base.cfg, "queue", q->name, rp.queue, sizeof rp.queue);
    names_redis(r->base.cfg, "returned", q->name, rp.returned, sizeof rp.returned);
    names_redis(r->base.cfg, "worker", NULL, rp.worker, sizeof rp.worker);
    names_redis(r->base.cfg, "inflight", q->name, rp.inflight, sizeof rp.inflight);
    names_redis(r->base.cfg, kind, q->name, pattern, sizeof pattern);
    rp.plen = strlen(pattern) + 1; /* "...:<kind>:<q>:" */
    strcat(pattern, ":*");
    int rc = scan_keys(r, pattern, reap_one, &rp);
    *moved += rp.moved;
    return rc;
}

/* The lanes q does not have (redis_script_lane_sweep: from q->lanes, or all
 * when it has none, up to LANES_MAX) emptied onto the consuming end of its
 * intake: commands left there when its lanes were lowered or removed (a
 * configuration change) are not stranded. Adds to *moved how many moved.
 * Returns 0 or the class of the failure. */
static int sweep_lanes(struct redis_broker *r, const struct cfg_queue *q, const char *queue, long long *moved) {
    redisReply *rep = redis_conn_cmd(r, "EVAL %s 1 %s %s:lane: %d %d", redis_script_lane_sweep, queue, queue,
                                     q->lanes >= 2 ? q->lanes : 0, LANES_MAX);
    if (!rep) return redis_conn_last_error(r);
    if (rep->integer > 0)
        log_warn("%lld command%s waited in lanes %s no longer has (lanes = %d): moved back to its intake",
                 rep->integer, rep->integer == 1 ? "" : "s", queue, q->lanes);
    *moved += rep->integer;
    freeReplyObject(rep);
    return 0;
}

/* Every Redis queue: on the first call, the lanes it does not have emptied
 * into its intake (sweep_lanes); due retries back (redis_script_due), the in-flight lists
 * of workers whose liveness key expired returned (redis_script_return; a
 * laned queue's to the heads of their lanes, redis_script_lane_return, and
 * for an ordered one also the workers that only own lanes: their owned sets).
 * Returns how many messages moved, or the class of the failure. */
static int redis_maintain(struct broker *b) {
    struct redis_broker *r = (struct redis_broker *)b;
    char now[32], queue[256], retry[256], returned[256];
    snprintf(now, sizeof now, "%lld", (long long)clock_ms());
    long long moved = 0;
    for (int i = 0; i < b->cfg->nqueues; i++) {
        const struct cfg_queue *q = &b->cfg->queues[i];
        if (q->transport != TRANSPORT_REDIS) continue;
        names_redis(b->cfg, "queue", q->name, queue, sizeof queue);
        int rc = r->swept ? 0 : sweep_lanes(r, q, queue, &moved);
        if (rc < 0) return rc;
        names_redis(b->cfg, "retry", q->name, retry, sizeof retry);
        names_redis(b->cfg, "returned", q->name, returned, sizeof returned);
        redisReply *rep = redis_conn_cmd(r, "EVAL %s 3 %s %s %s %s", redis_script_due, retry, queue, returned, now);
        if (!rep) return redis_conn_last_error(r);
        moved += rep->integer;
        freeReplyObject(rep);
        rc = reap(r, q, "inflight", &moved);
        /* an ordered queue's worker may own lanes with nothing in flight */
        if (rc == 0 && q->lanes >= 2 && q->ordered) rc = reap(r, q, "laneowned", &moved);
        if (rc < 0) return rc;
    }
    r->swept = true;
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
    redisReply *rep = redis_conn_cmd(r, "LRANGE %s 0 -1", dead);
    if (!rep) return redis_conn_last_error(r);
    if (out) *out = xcalloc(rep->elements ? rep->elements : 1, sizeof **out);
    int rc = 0, index = 0;
    for (size_t i = rep->elements; i-- > 0 && rc == 0;) {  /* LPUSHed: the oldest is last */
        redisReply *e = rep->element[i];
        struct dead_letter d;
        if (!parse_dead(e->str, &d)) continue;
        index++;
        if (sel && sel(&d, index, arg)) {
            /* retry: onto the queue first, then out of the dead letters */
            const char *const cmds[2] = {requeue ? "LPUSH" : "LREM", "LREM"};
            const char *const keys[2] = {requeue ? queue : dead, dead};
            const char *const vals[2] = {requeue ? d.body : e->str, e->str};
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
    redisReply *rep = redis_conn_cmd(r, "LRANGE %s %ld %ld", dead, -(offset + limit), -(offset + 1));
    if (!rep) return redis_conn_last_error(r);
    *out = xcalloc(rep->elements ? rep->elements : 1, sizeof **out);
    for (size_t i = rep->elements; i-- > 0;) /* the range comes newest first */
        if (parse_dead(rep->element[i]->str, &(*out)[*n])) (*n)++;
    freeReplyObject(rep);
    return 0;
}

/* The integer reply of a command on key (LLEN, ZCARD) into *n. Returns 0 or a class. */
static int key_count(struct redis_broker *r, const char *command, const char *key, long *n) {
    redisReply *rep = redis_conn_cmd(r, "%s %s", command, key);
    if (!rep) return redis_conn_last_error(r);
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

/* Adds the LLEN of key to *(long *)arg. Returns 0 or a class (scan_keys). */
static int add_llen(struct redis_broker *r, const char *key, void *arg) {
    long n = 0;
    int rc = key_count(r, "LLEN", key, &n);
    if (rc == 0) *(long *)arg += n;
    return rc;
}

/* The sum of LLEN over every lane of the laned queue q (one pipeline) into
 * *n. Returns 0 or a class. */
static int lanes_waiting(struct redis_broker *r, const struct cfg_queue *q, long *n) {
    if (redis_conn_ready(r) < 0) return CV_ERETRY;
    char key[300];
    for (int c = 0; c < LANE_CLASSES; c++)
        for (int i = 0; i < q->lanes; i++) {
            names_redis_lane(r->base.cfg, q->name, c, i, key, sizeof key);
            redisAppendCommand(r->ctx, "LLEN %s", key);
        }
    long long len[LANE_CLASSES * LANES_MAX];
    int rc = redis_conn_read_ints(r, LANE_CLASSES * q->lanes, "LLEN", len);
    *n = 0;
    for (int i = 0; rc == 0 && i < LANE_CLASSES * q->lanes; i++) *n += (long)len[i];
    return rc;
}

/* LLEN of the queue (with a laned queue's lanes) and of its dead letters,
 * ZCARD of its retry set, and the LLEN of every worker's in-flight list of it
 * (found with SCAN). */
static int redis_queue_counts(struct broker *b, const struct cfg_queue *q, struct queue_counts *out) {
    struct redis_broker *r = (struct redis_broker *)b;
    char key[256], pattern[300];
    names_redis(b->cfg, "queue", q->name, key, sizeof key);
    int rc = key_count(r, "LLEN", key, &out->waiting);
    long in_lanes = 0;
    if (rc == 0 && q->lanes >= 2 && (rc = lanes_waiting(r, q, &in_lanes)) == 0) out->waiting += in_lanes;
    names_redis(b->cfg, "dead", q->name, key, sizeof key);
    if (rc == 0) rc = key_count(r, "LLEN", key, &out->dead);
    names_redis(b->cfg, "retry", q->name, key, sizeof key);
    if (rc == 0) rc = key_count(r, "ZCARD", key, &out->retrying);
    if (rc < 0) return rc;
    out->in_flight = 0;
    names_redis(b->cfg, "inflight", q->name, pattern, sizeof pattern);
    strcat(pattern, ":*");
    return scan_keys(r, pattern, add_llen, &out->in_flight);
}

/* Each lane of the laned queue q: its LLEN, and the age of its oldest (the
 * createdAt of LINDEX -1, the consuming end; -1 when it has none or it is no
 * RFC 3339 date-time), in one script (redis_script_lane_counts). Returns 0
 * or a class. */
static int redis_lane_counts(struct broker *b, const struct cfg_queue *q, struct lane_count *out) {
    struct redis_broker *r = (struct redis_broker *)b;
    char base[256];
    names_redis(b->cfg, "queue", q->name, base, sizeof base);
    redisReply *rep = redis_conn_cmd(r, "EVAL %s 0 %s:lane: %d", redis_script_lane_counts, base, q->lanes);
    if (!rep) return redis_conn_last_error(r);
    int64_t now = clock_ms();
    for (int i = 0; rep->type == REDIS_REPLY_ARRAY && i < LANE_CLASSES * q->lanes &&
                    (size_t)(2 * i + 1) < rep->elements; i++) {
        const redisReply *len = rep->element[2 * i], *oldest = rep->element[2 * i + 1];
        out[i].depth = len->type == REDIS_REPLY_INTEGER ? (long)len->integer : 0;
        if (oldest->type != REDIS_REPLY_STRING) continue;
        cJSON *o = cJSON_ParseWithLength(oldest->str, oldest->len);
        const cJSON *at = cJSON_GetObjectItemCaseSensitive(o, "createdAt");
        int64_t ms = 0;
        if (cJSON_IsString(at) && clock_rfc3339_ms(at->valuestring, &ms)) out[i].oldest_age_s = (now - ms) / 1000.0;
        cJSON_Delete(o);
    }
    freeReplyObject(rep);
    return 0;
}

static int redis_publish_events(struct broker *b, const struct outgoing_event *ev, int n) {
    struct redis_broker *r = (struct redis_broker *)b;
    if (redis_conn_ready(r) < 0) return CV_ERETRY;
    char maxlen[32];
    snprintf(maxlen, sizeof maxlen, "%ld", b->cfg->events_maxlen);
    for (int i = 0; i < n; i++) {
        if (ev[i].aggregate_id && ev[i].aggregate_id[0]) /* the subscriptions' partition key (section 13) */
            redisAppendCommand(r->ctx, "XADD %s MAXLEN ~ %s * type %s aggregate %s event %s", r->events_key, maxlen,
                               ev[i].type, ev[i].aggregate_id, ev[i].json);
        else
            redisAppendCommand(r->ctx, "XADD %s MAXLEN ~ %s * type %s event %s", r->events_key, maxlen,
                               ev[i].type, ev[i].json);
    }
    int rc = redis_conn_read_replies(r, n, "XADD");
    return rc < 0 ? rc : redis_conn_wait_replicas(r, "XADD");
}

static int redis_subscribe(struct broker *b, const char *pattern) {
    struct redis_broker *r = (struct redis_broker *)b;
    free(r->pattern);
    r->pattern = xstrdup(pattern ? pattern : "#");
    redisReply *rep = redis_conn_cmd(r, "XREVRANGE %s + - COUNT 1", r->events_key);
    if (!rep) return redis_conn_last_error(r);
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
        redis_conn_block_next(r, (int)left);
        redisReply *rep = redis_conn_cmd(r, "XREAD COUNT 256 BLOCK %lld STREAMS %s %s", (long long)left,
                              r->events_key, r->last_id);
        if (!rep) return redis_conn_last_error(r);
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
    .release = redis_release,
    .dead_letter = redis_dead_letter,
    .retry = redis_retry,
    .maintain = redis_maintain,
    .dead_walk = redis_dead_walk,
    .dead_page = redis_dead_page,
    .dead_count = redis_dead_count,
    .queue_counts = redis_queue_counts,
    .lane_counts = redis_lane_counts,
    .publish_events = redis_publish_events,
    .subscribe = redis_subscribe,
    .next_event = redis_next_event,
    .subscription_declare = redis_subscription_declare,
    .subscription_attach = redis_subscription_attach,
    .subscription_detach = redis_subscription_detach,
    .subscription_fetch = redis_subscription_fetch,
    .subscription_keepalive = redis_subscription_keepalive,
    .subscription_ack = redis_subscription_ack,
    .subscription_counts = redis_subscription_counts,
    .subscription_remove = redis_subscription_remove,
};

/* A connection (redis_conn_open) with the operations' table: see broker_backend.h. */
struct broker *broker_redis_open(const struct cfg *cfg, int *cls, char *err, size_t errlen) {
    struct redis_broker *r = redis_conn_open(cfg, cls, err, errlen);
    if (!r) return NULL;
    r->base.ops = &redis_ops;
    names_redis(cfg, "events", NULL, r->events_key, sizeof r->events_key);
    return &r->base;
}
