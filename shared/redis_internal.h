/* redis_internal.h - what the pieces of the Redis backend share; only they
 * include it. The pieces, and the one way calls go between them:
 *
 *   broker_redis.c     the operations, the table of them, broker_redis_open
 *     -> redis_heartbeat.c  the worker's liveness key and its thread (vouch_*)
 *     -> redis_conn.c       URL, Sentinels, connect and login, commands with timeouts
 *     -> redis_scripts.c    the Lua scripts (constants)
 *   redis_heartbeat.c -> redis_conn.c
 *
 * None of them calls back up that list; all of them may use broker_common.c
 * (broker_backend.h) and shared/liveness.c (core.h). */
#ifndef CONVEYOR_REDIS_INTERNAL_H
#define CONVEYOR_REDIS_INTERNAL_H

#include "broker_backend.h"

#include <hiredis/hiredis.h>
#include <stdatomic.h>

struct vouch; /* the heartbeat thread (redis_heartbeat.c) */
struct lane_args; /* a laned queue's routing arguments (broker_redis.c) */

/* One Redis broker: a connection (redis_conn.c) and what the operations keep. */
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
    /* a laned queue (q->lanes >= 2; docs/contract.md, "Lanes"), set by consume */
    int lanes;                /* N, or 0: no lanes (the code path of a plain queue) */
    bool ordered;             /* lane owner keys: one worker per lane at a time */
    char lane_prefix[300];    /* <prefix>:queue:<q>:lane: (then <class>:<i>) */
    char owner_prefix[300];   /* <prefix>:laneowner:<q>: (then <class>:<i>), "" unless ordered */
    char owned_key[600];      /* <prefix>:laneowned:<q>:<workerId>: the owner keys this worker set */
    char worker_id[256];
    struct lane_args *route;  /* the type -> aggregate field map as script arguments */
    unsigned long takes;      /* takes that took something: lane_take_order's n and the lanes' cursor */
    int poll_ms;              /* broker_next's pause between polls now (lane_next), 0 after a take found some */
    bool swept;               /* broker_maintain has emptied the lanes the queues no longer have (once) */
    int back[LANE_CLASSES * LANES_MAX]; /* messages put back per lane since the last take (lane_back) */
    struct redis_sub *sub;    /* a durable subscription's attached partitions (redis_subscription.c), or NULL */
    /* subscription */
    char *pattern;
    char last_id[64];
    char **pending;       /* events read but not yet returned */
    int npending, ipending;
};

/* ---- redis_conn.c: the connection ------------------------------------------------------- */

/* A connection for cfg's redis.url: a zeroed struct redis_broker (base.cfg set,
 * base.ops not: the caller sets what it needs) with the URL parsed and the
 * server connected and logged in. Returns it (the caller frees it with
 * redis_conn_close, or frees what it added and then redis_conn_drop and
 * free), or NULL with why in err and the class in *cls: CV_ECONFIG for a bad
 * URL ("bad Redis URL: ...") or a refused login, CV_ERETRY when the server (or
 * every Sentinel) could not be reached. cfg is borrowed and must outlive it. */
struct redis_broker *redis_conn_open(const struct cfg *cfg, int *cls, char *err, size_t errlen);
/* Closes what redis_conn_open opened and nothing more: says the connection
 * owes no reply (broker_note BROKER_IDLE), drops it and frees r. NULL is a no-op. */
void redis_conn_close(struct redis_broker *r);
/* Connects r->ctx when it has none or it broke: through the Sentinels when
 * the URL names them (the primary they name must say it is one), then the
 * login (AUTH, SELECT, or a PING). Returns 0, or the class of the failure
 * with the reason in r->base.err (CV_ECONFIG: refused on what the URL says;
 * CV_ERETRY: anything else), the connection dropped. */
int redis_conn_connect(struct redis_broker *r);
/* Makes r->ctx usable (redis_conn_connect), probing a connection idle for
 * long first. Returns 0, or the class of the failure with the reason in
 * r->base.err. */
int redis_conn_ready(struct redis_broker *r);
/* Frees r->ctx, if any (r stays usable: the next command connects again), and
 * marks the in-flight list to be returned before the next take of a consumer. */
void redis_conn_drop(struct redis_broker *r);
/* The next command (redis_conn_cmd, redis_conn_argv_cmd) blocks up to ms on
 * the server: its socket timeout is that much longer. */
void redis_conn_block_next(struct redis_broker *r, int ms);
/* Sends a command (hiredis format) on a ready connection with its socket
 * timeout. Returns the reply (the caller frees it with freeReplyObject), or
 * NULL with the reason in r->base.err when there was none (the connection is
 * dropped), or it was an error reply (freed); redis_conn_last_error then
 * tells the class. */
redisReply *redis_conn_cmd(struct redis_broker *r, const char *fmt, ...);
/* As redis_conn_cmd, with the arguments as an array (borrowed). */
redisReply *redis_conn_argv_cmd(struct redis_broker *r, int argc, const char **argv, const size_t *argl);
/* The class of the failure a NULL reply of redis_conn_cmd stands for:
 * CV_EREFUSED (an error reply; the connection stands), CV_ECONFIG (the login
 * was refused) or CV_ERETRY (the connection was lost). */
int redis_conn_last_error(struct redis_broker *r);
/* Reads the replies of n pipelined commands (redisAppendCommand on r->ctx).
 * Returns 0, CV_EREFUSED if Redis refused one, or CV_ERETRY when the
 * connection broke (it is then dropped); the reason in r->base.err. */
int redis_conn_read_replies(struct redis_broker *r, int n, const char *what);
/* As redis_conn_read_replies, and ints[i] (when ints is not NULL) gets reply i
 * when it is an integer (else 0). */
int redis_conn_read_ints(struct redis_broker *r, int n, const char *what, long long *ints);
/* With redis.wait_replicas: waits (WAIT) until that many replicas have what
 * this connection wrote. Returns 0 (also without the setting), or CV_ERETRY
 * (not confirmed in time, or the connection was lost) or CV_EREFUSED with
 * the reason in r->base.err. */
int redis_conn_wait_replicas(struct redis_broker *r, const char *what);

/* ---- redis_heartbeat.c: the worker's liveness key ------------------------------------- */

/* Starts the heartbeat thread of a consuming worker (r->heartbeat_key set;
 * q gives the statement bounds its stall limit counts). Returns nothing: on
 * failure the key is refreshed between takes only (logged). r must outlive
 * it: redis_heartbeat_stop before r is freed. */
void redis_heartbeat_start(struct redis_broker *r, const struct cfg_queue *q);
/* Stops and joins the heartbeat thread, if any, and frees it. */
void redis_heartbeat_stop(struct redis_broker *r);
/* Notes progress (liveness_progress) and refreshes the worker's liveness key
 * over r when it is due. Returns 0, or the class of the failure
 * (redis_conn_last_error) with the reason in r->base.err. */
int redis_heartbeat_refresh(struct redis_broker *r);

/* ---- redis_scripts.c: the Lua scripts (each one's comment is there) -------------------- */

extern const char redis_script_return[]; /* an in-flight list back to its queue */
extern const char redis_script_take[];   /* held acks removed, then a fair share taken */
extern const char redis_script_moves[];  /* a message copied, then removed (requeue, dead letters) */
extern const char redis_script_retry[];  /* into the retry set, then out of flight */
extern const char redis_script_due[];    /* due retries back to their queue */
extern const char redis_script_bounded_push[]; /* LPUSH unless the list holds max_length (bounded queues) */
/* laned queues (q->lanes >= 2) */
extern const char redis_script_lane_take[];    /* acks, the intake sorted into lanes, then a fair share taken */
extern const char redis_script_lane_return[];  /* an in-flight list back to the heads of its lanes, lanes freed */
extern const char redis_script_lane_back[];    /* one message back to the head of its lane (requeue, release) */
extern const char redis_script_lane_release[]; /* acks, then the worker's lanes freed once nothing is in flight */
extern const char redis_script_lane_bounded_push[]; /* LPUSH unless the intake and the lanes hold max_length */
extern const char redis_script_lane_counts[];  /* each lane's length and oldest message */
extern const char redis_script_lane_sweep[];   /* lanes a queue no longer has emptied into its intake */
extern const char redis_script_subscription_groups[]; /* a subscription's partition groups, at one id (section 13) */
extern const char redis_script_subscription_resync[]; /* a caught-up group's entries-read set right after a gap */


/* ---- redis_subscription.c: a durable subscription's partitions (core.h) ----------------- */
int redis_subscription_declare(struct broker *b, const struct subscription_spec *s);
int redis_subscription_attach(struct broker *b, const struct subscription_spec *s, int partition, int prefetch);
int redis_subscription_detach(struct broker *b, int partition);
int redis_subscription_fetch(struct broker *b, struct sub_delivery *out, int max, const int *room, int timeout_ms);
int redis_subscription_keepalive(struct broker *b);
int redis_subscription_ack(struct broker *b, const struct sub_delivery *d);

/* ---- redis_subscription_admin.c: a subscription's counts, and its removal (core.h) -------- */
int redis_subscription_counts(struct broker *b, const struct subscription_spec *s, struct subscription_counts *out);
int redis_subscription_remove(struct broker *b, const struct subscription_spec *s);

#endif
