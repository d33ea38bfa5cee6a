/*
 * workers.h - the internal header of conveyor-workers' and conveyor-admin's
 * processes (workers/): the batch, the worker loop, the outbox relay, the
 * supervisor, the scoreboard, the dead letters. It includes domain.h, the
 * header of the handlers' room (workers/domain/); the HTTP child's own
 * declarations are in workers/http/http.h, which nothing outside http/ includes.
 */
#ifndef CONVEYOR_WORKERS_H
#define CONVEYOR_WORKERS_H

#include "domain.h"

#include <sys/types.h>

/* ---- batch.c: the transaction of a batch --------------------------------------- */
enum outcome { OUTCOME_APPLIED, OUTCOME_REJECTED, OUTCOME_DUPLICATE }; /* as enum sb_outcome's first three */

/* One message of a batch, from delivery to settlement (worker.c owns it). */
struct batch_item {
    struct delivery d;
    struct envelope env;
    const struct handler *handler;
    bool live;            /* parsed, known, within its attempts: it takes part in the transaction */
    bool parked;          /* not due yet: parked in the database (parking_park), to be acked; not live */
    bool exhausted;       /* out of attempts (count_attempts): dead-letter it, error says why */
    int attempts;         /* handler starts, this one included */
    bool counted;         /* its attempts are in command_attempts (it was redelivered) */
    bool claimed;         /* its dedup row is in this transaction: it runs */
    int rc;               /* its outcome (enum outcome) or error class */
    cJSON *events;        /* what it emitted, for the batch's outbox insert (owned) */
    int handle;           /* run ahead: the handle of its first statement's result (db_defer_result), or -1 */
    PGresult *first;      /* run ahead: that result, until its handler takes it (owned) */
    bool alone;           /* its statement failed when run ahead: it runs alone (and meets the error once more) */
    char *error;          /* with a failure: the database's error text (owned) */
    char key[ID_LEN + 3]; /* the row it locks first (handler_lock_key), for lock order; or "" */
    int64_t started_us;   /* when its handler first started (clock_mono_us), or 0 */
    /* its rate limit (rate_limit.c): set by rate_limit_bind when it is admitted */
    const struct cfg_rate_limit *limit; /* the limit that counts its type, or NULL */
    char bucket[RATE_BUCKET_MAX];       /* the bucket: its key's value ("" without a key) */
    int token_shard;      /* the row of the token it holds in the open transaction, or -1 */
    bool limit_rejected;  /* no token, over = "reject": the batch rejects it RATE_LIMITED */
    int64_t later_ms;     /* no token: when it is due (parked) or a token is expected (retryAfterMs) */
    /* order per key in an ordered queue (key_hold.c) */
    char order_key[LANE_KEY_MAX]; /* its ordering key (lane_order_key), once order_key_set; "" for none */
    bool order_key_set;
    bool holder;          /* it holds its key (released to go next, or retried): its settling passes the key on */
    bool will_hold;       /* it failed and is retried: it holds its key from this commit on */
    bool behind;          /* parked behind an earlier command of its key (parked too) */
    bool dead_next;       /* it failed for the last time: dead-lettered after the commit, its key passed on */
};

/* A worker's transactions: its connection and what a batch needs to know. */
struct batch {
    struct db *db;               /* the worker's connection (not owned; set before each call) */
    const struct cfg *cfg;
    const struct cfg_queue *q;
    char notify_sql[160];        /* NOTIFY "<prefix>_outbox" */
    int claim;                   /* the handle of the dedup insert's result while it is pending, or -1 */
    uint64_t xid;                /* the open transaction's id once a dedup row is in it (claim_read), else 0 */
};
/* Fills b for the queue q of cfg (both kept: they must outlive b; b->db is set
 * by the caller). */
void batch_init(struct batch *b, const struct cfg *cfg, const struct cfg_queue *q);
/* Runs the n admitted items v of one take, handed over once: counts the
 * start of each redelivered one (an item out of attempts is marked exhausted,
 * with its error, and does not run), orders the live ones by the row each
 * locks first (batch_order), runs them in one transaction (each alone when
 * the database refused the batch as a whole) and counts what committed in the
 * scoreboard. Returns 0: then each item's live, exhausted and rc (an outcome,
 * or the error class of a failed attempt, with error) say how the caller
 * settles it; or the error class of the attempt count (the database away
 * before anything ran: no item ran, none is live, the caller hands them back). */
int batch_process(struct batch *b, struct batch_item **v, int n);
/* True when some item locks several products: the batch then locks them all
 * first, in one statement (batch.c's lock_batch), and keeps arrival order. */
bool batch_locks_several(struct batch_item *const *v, int n);
/* Orders v stably by key (the row each command locks first): every batch
 * takes its rows' locks in one order, so concurrent batches do not deadlock;
 * commands on one aggregate keep their order. Keeps arrival order when
 * batch_locks_several. (batch_order.c: pure, unit-tested.) */
void batch_order(struct batch_item **v, int n);
/* Frees what running an item left (error text, events, a first result; not its
 * delivery or envelope) and clears claimed and rc; it can run again. */
void batch_item_forget(struct batch_item *it);

/* ---- rate_limit.c: rate limits counted on committed work -------------------------- */
/* Sets it's limit (cfg_rate_limit_for its type) and bucket (its key's value in
 * the payload), and no token held. */
void rate_limit_bind(const struct cfg *cfg, struct batch_item *it);
/* Forgets the token it held and its limit's verdict (its transaction ended). */
void rate_limit_forget(struct batch_item *it);
/* Inside the open transaction, once the dedup rows are claimed: each claimed
 * item of a limited type takes a token of its bucket (rows locked until the
 * transaction ends; buckets in one order), or, with none left, is parked
 * (over = "wait": parked_commands row and dedup row removal deferred, marked
 * parked and not claimed: the caller acks it after the COMMIT) or marked
 * limit_rejected with later_ms (over = "reject"). Returns how many it parked,
 * or an error class (the transaction is then to be rolled back). */
int rate_limit_take(struct db *db, const struct cfg_queue *q, struct batch_item **v, int n);
/* Defers the return of the tokens of the items that did no work (rejected, a
 * duplicate, or failed alone and rolled back to their savepoint) to the rows
 * they came from, before the COMMIT. Returns 0 or an error class. */
int rate_limit_refund_defer(struct db *db, struct batch_item **v, int n);

/* True when the failed item it (rc < 0) is retried after its batch; false
 * when the worker dead-letters it (a class other than CV_ERETRY, or its last
 * attempt). The one rule of worker.c's attempt_failed and of the batch's key
 * holds (batch.c tells key_hold_failed). */
bool batch_will_retry(const struct cfg_queue *q, const struct batch_item *it);

/* ---- key_hold.c: order per key in an ordered queue (docs/contract.md, section 10) ---- */
/* After the claim (claimed items only), in the batch's open transaction: reads
 * the holds of the items' ordering keys (locked until the transaction ends);
 * an item whose key another command holds is parked behind it (deferred) and
 * marked parked and behind (not run; acked after the COMMIT); an item that
 * holds its key is marked holder. Nothing for a queue that is not ordered.
 * Returns how many it parked, or an error class (the transaction is then to
 * be rolled back; the items marked are not: nothing was marked). */
int key_hold_check(struct db *db, const struct cfg_queue *q, struct batch_item **v, int n);
/* Item v[i] of an ordered queue failed. Retried (retried: batch_will_retry), it will
 * hold its key, and the items after it in v[i+1..n) of that key that are
 * claimed and not parked are marked parked behind it; else it is marked
 * dead_next (its key passes on: key_hold_settle_defer). Returns how many it
 * marked behind (0 when q is not ordered or v[i] has no key). */
int key_hold_failed(const struct cfg_queue *q, struct batch_item **v, int i, int n, bool retried);
/* Defers, before the COMMIT: the parking of the nbehind items behind[] that
 * key_hold_failed marked, the holds of the items of v[0..n) that failed, and
 * the release of the keys whose holder settled. Returns 0 or an error class. */
int key_hold_settle_defer(struct db *db, const struct cfg_queue *q, struct batch_item **v, int n,
                          struct batch_item **behind, int nbehind);
/* The keys held by the items of v that are out of attempts (exhausted: to be
 * dead-lettered) pass on, in a statement of its own (no transaction open).
 * Returns 0 or an error class (then none passed on: the caller must not
 * dead-letter them yet). */
int key_hold_release_exhausted(struct db *db, const struct cfg_queue *q, struct batch_item **v, int n);

/* ---- rate_limit_buckets.c: the buckets seen from outside a transaction ----------- */
/* A rate limit now (what stats, /metrics and the dashboard show). */
struct rate_limit_state {
    const struct cfg_rate_limit *rl; /* its configuration (points into the cfg read) */
    bool read;            /* its rows were read (false: none yet, or not read) */
    double tokens;        /* tokens now (refilled to the database's now); a keyed limit: its emptiest bucket */
    long long buckets;    /* buckets with rows (a keyed limit: keys seen lately) */
    long long waited;     /* commands parked for a token, committed, since the limit was first used */
    long long rejected;   /* commands rejected RATE_LIMITED, committed */
    long long waiting;    /* parked for a token now (rate_limit_waiting_read) */
};
/* Every limit of cfg into out (cfg->nrate_limits entries, in cfg order):
 * tokens, buckets, waited, rejected (waiting is left as it was); a limit never
 * used is full. Returns 0 or the error class. */
int rate_limit_states_read(struct db *db, const struct cfg *cfg, struct rate_limit_state *out);
/* The commands parked for each limit's token now into out[i].waiting (a walk
 * of the parked rows: for stats, not for every sample). Returns 0 or the error class. */
int rate_limit_waiting_read(struct db *db, const struct cfg *cfg, struct rate_limit_state *out);
/* st as JSON (caller frees): name, types, queue, rate, perSecond, burst, key,
 * over, shards, tokens, buckets, waited, rejected, waiting. */
cJSON *rate_limit_state_json(const struct rate_limit_state *st);

/* ---- forward_view.c: the producers' outboxes as an operator sees them ------------- */
struct forward_state {
    const struct cfg_producer *producer; /* points into the cfg read */
    bool read;                 /* forward_state has its row (false: no forwarder has counted it yet) */
    long long pending, failed; /* rows waiting, rows kept as failed, as last counted */
    double oldest_age_s;       /* the oldest pending row's age now (0: none) */
    double report_age_s;       /* how long ago it was counted (-1: never) */
};
/* Every producer of cfg into out (cfg->nproducers entries, in cfg order) from
 * forward_state. Returns 0 or the error class. */
int forward_states_read(struct db *db, const struct cfg *cfg, struct forward_state *out);
/* {producer, pending, failed, oldestAgeSeconds, reportAgeSeconds} (nulls when
 * not counted yet); the caller owns it. */
cJSON *forward_state_json(const struct forward_state *st);

/* ---- subscription_view.c: the durable subscriptions as an operator sees them ------- */
/* One row of the registry (docs/contract.md section 13), its strings malloc'd. */
struct subscription_row {
    char *name, *transport;    /* transport: "rabbitmq" or "redis" */
    char **patterns;           /* npatterns topic patterns */
    int npatterns, partitions;
    char *start_from;          /* as created: newest, oldest, an RFC 3339 time, an event id */
    char *created_at;          /* RFC 3339 */
    char *last_seen_at;        /* a process of it last reported (NULL: never) */
    long lag;                  /* as a pool last counted it (-1: not counted yet) */
    double oldest_age_s;       /* the oldest unsettled event's age now, from that count (-1: not counted) */
    double counted_age_s;      /* how long ago it was counted (-1: never) */
    char *gap;                 /* Redis: a gap was seen, and what (NULL: none) */
    double empty_age_s;        /* RabbitMQ: since its queues were last seen empty (or its creation) */
    long dead;                 /* its dead letters (subscription_dead) */
};
/* The registry's rows (only the one named name when not NULL), by name, into
 * *out (n of them; subscription_rows_free frees). Returns 0 or the error class
 * (*out NULL, *n 0). */
int subscription_rows_read(struct db *db, const char *name, struct subscription_row **out, int *n);
void subscription_rows_free(struct subscription_row *rows, int n);
/* s as a broker's spec (borrowing s's strings) and its transport into *t:
 * true, or false when the row names no transport Conveyor knows. */
bool subscription_row_spec(const struct subscription_row *s, enum transport *t, struct subscription_spec *spec);
/* {name, transport, patterns, partitions, from, createdAt, lastSeenAt, lag,
 * oldestAgeSeconds, gap, gapNote, dead, countedAgeSeconds} (nulls where not
 * known); the caller owns it. */
cJSON *subscription_row_json(const struct subscription_row *s);

/* ---- subscription_count.c: the pools' count of the subscriptions ----------------- */
/* Writes counts c of subscription name (of transport t) to its registry row:
 * lag, counted_at, oldest_age_seconds (RabbitMQ: from empty_seen_at, set when
 * c->lag is 0), gap (noted once seen, kept). Returns 0 or the error class. */
int subscription_count_write(struct db *db, const char *name, enum transport t, const struct subscription_counts *c);
/* Counts every registered subscription whose transport has a broker in
 * brokers (by enum transport; NULL: skipped) and writes each one's counts.
 * A broker that fails is not used again in this call and failed[t] is set
 * (the caller reopens it). Returns how many were counted, or the database's
 * error class. */
int subscription_count_all(struct db *db, struct broker *const brokers[2], bool failed[2]);

/* ---- lane_view.c: the lanes of a queue as an operator sees them ------------------ */
/* {queue, lanes, ordered, classes: [{class, waiting, deepestLane, deepestDepth,
 * oldestAgeSeconds}], lane: [{lane: "<class>.<i>", depth, oldestAgeSeconds}]}
 * of the laned queue q from its counts c (LANE_CLASSES * q->lanes, class by
 * class; an age < 0 is null: not known). The caller owns the object. */
cJSON *lane_queue_json(const struct cfg_queue *q, const struct lane_count *c);
/* The active timekeeper, about once a minute: deletes the buckets of keyed
 * limits that have been full for a minute (up to 10,000), adding their counts
 * to their limit's totals row. Returns how many rows it deleted, or the error class. */
int rate_limit_prune(struct db *db, const struct cfg *cfg);

/* ---- parking.c: commands that wait for their time ------------------------------ */
/* Parks each of the n items v of queue q whose notBefore is still to come by
 * the database's clock (and that is not processed already) in parked_commands,
 * in one statement; a copy of one parked already counts as parked. Marks them
 * parked (the caller acks them; they must not run). Items without a valid
 * notBefore are left alone. Returns how many are parked, or the error class
 * of the statement (none marked). */
int parking_park(struct db *db, const struct cfg_queue *q, struct batch_item **v, int n);
/* One pass of the active timekeeper: claims up to batch parked rows that are
 * due by the database's clock (FOR UPDATE SKIP LOCKED), publishes each to the
 * queue that routes it now through brokers[transport] (opened when NULL,
 * owned by the caller), and deletes them once the broker confirmed them, in
 * one transaction. Returns how many were published, or an error class with
 * why in err (the rows stay parked; a broker that failed is closed and NULL);
 * CV_EFULL: a bounded queue was full, its rows stay parked (those it took and
 * the other queues' rows are published and deleted), why in err. */
int parking_release(struct db *db, const struct cfg *cfg, struct broker *brokers[2], int batch, char *err,
                    size_t errlen);

/* ---- queue_limits.c: bounded queues' policies on RabbitMQ ------------------------ */
/* Sets, through rabbitmq.management_url, the policy of each RabbitMQ queue with
 * max_length (max-length, overflow reject-publish; merged with an operator's
 * policy that matches the queue, at a priority above it) and deletes it for one
 * without. Nothing to do (0) when no RabbitMQ queue is bounded and no URL is
 * set. Returns 0, or a class with why in err (never a password): CV_ECONFIG (a
 * bounded queue and no URL; credentials refused), CV_ERETRY (the API cannot be
 * reached, or a 5xx), CV_EREFUSED (another refusal). */
int queue_limits_apply(const struct cfg *cfg, char *err, size_t errlen);

/* ---- schedule_fire.c: the schedules' slots, fired by the active timekeeper ------ */
/* When each schedule of the configuration is next looked at (monotonic ms;
 * 0: at the next pass). Owned by the timekeeper's active spell. */
struct schedule_firing {
    int64_t *look_at;
    int n;
};
void schedule_firing_init(struct schedule_firing *f, const struct cfg *cfg);
void schedule_firing_free(struct schedule_firing *f);
/* For every schedule whose time to look has come: parks the command of each
 * slot that is due by the database's clock (id: the slot's UUIDv5; due at the
 * slot's instant, so parking_release publishes it at once), skips slots as its
 * catch_up says, and records the schedule's state (schedules row), in one
 * transaction per schedule. Returns how many slots it fired, or the error
 * class of the first failure (logged; that schedule is looked at again on
 * the next pass). */
int schedule_fire_due(struct db *db, const struct cfg *cfg, struct schedule_firing *f);
/* conveyor-admin schedules run: parks one command of s due now, with a random
 * id (into id) and correlationId "schedule:<name>:run", and counts it in the
 * schedule's runs, in one transaction (the active timekeeper publishes it
 * within its next pass). Returns 0 or an error class. */
int schedule_run_now(struct db *db, const struct cfg *cfg, const struct cfg_schedule *s, char id[ID_LEN + 1]);

/* ---- claim_floor.c: where an outbox claim starts (the relay's, the forwarder's) --------- */
/* The floor of claims: any id at or below it that will ever be committed is
 * marked already (the argument: claim_floor.c). */
struct claim_floor {
    int64_t floor;        /* claims start above this id */
    int64_t pending_id;   /* the candidate's L (0: no candidate) */
    uint64_t pending_xid; /* the candidate's S */
    long moves;           /* how often the floor moved (logged when the relay stops being active) */
    long below;           /* rows the stopping relay's claim from the start found at or below the floor */
};
/* What a claim read besides its rows: the sequence's last id and the xmin of
 * the claim's own snapshot. */
struct claim_horizon {
    int64_t last_id;
    uint64_t xmin;
};
/* Called after a claim from f->floor whose rows (n, the last of them last)
 * are all marked: promotes the candidate if that claim covered it, then takes
 * a new candidate (h.last_id, mark_xid) if there is none (mark_xid 0: no
 * mark, no new candidate). */
void claim_floor_advance(struct claim_floor *f, struct claim_horizon h, int n, int batch, int64_t last,
                         uint64_t mark_xid);

/* ---- singleton.c: one process of a kind active across every pool ---------------- */
/* How a spell as the active one ended. */
enum singleton_end {
    SINGLETON_LOST,          /* stop asked for, or the database connection lost: it tries again */
    SINGLETON_GAVE_UP,       /* it could not do its work for a while and gave up its lock: it stands by
                              * gave_up_wait_ms before it tries again, so a healthy pool's process takes over */
    SINGLETON_CONFIG_REFUSED /* a server refused what the configuration says: it stops */
};
struct singleton {
    const char *name;  /* the lock is "<prefix>.<name>"; log lines say the name */
    const char *doing; /* what the active one does, for the log line */
    /* works while it holds the lock on db (and db is up, and no stop is asked for); says how it ended */
    enum singleton_end (*active)(const struct cfg *cfg, struct db *db);
    void (*standing_by)(const struct cfg *cfg, struct db *db); /* about once a second while another is active; or NULL */
    void (*stopping)(struct db *db);                           /* on stop, before its connection closes; or NULL */
    int (*gave_up_wait_ms)(const struct cfg *cfg);             /* after SINGLETON_GAVE_UP */
};
/* Connects (waiting while the database is away), takes the lock or stands by,
 * and runs s->active while it holds it, until stop_requested. Returns the exit
 * status: 0 when stopped, CV_EXIT_CONFIG when the database refused the
 * configuration or active said SINGLETON_CONFIG_REFUSED (logged). */
int singleton_run(const struct cfg *cfg, const struct singleton *s);
/* As singleton_run, on the database at url with the lock lock_name (a
 * producer's forwarder: its lock lives in the producer's database). */
int singleton_run_at(const struct cfg *cfg, const struct singleton *s, const char *url, const char *lock_name);

/* ---- worker.c / relay.c / supervisor.c ------------------------------------------ */
extern volatile sig_atomic_t stop_requested; /* set by SIGTERM / SIGINT in a child */

/* Consumes queue q (as its worker number index: which lanes) until stop_requested; returns the process exit status: 0
 * when stopped or recycled (max_jobs, max_rss_mb), CV_EXIT_CONFIG when the broker
 * or the database refuses the configuration (logged), 1 when broker_consume
 * fails. A broker or database that is away is waited for, not an exit. */
int worker_run(const struct cfg *cfg, const struct cfg_queue *q, const char *worker_id, int index);
/* Gives every queue of c the ordering field of each of its types from the
 * domain's table (handler_find's order_field; cfg_set_order_field), after
 * cfg_load and before forking (supervisor.c). */
void pool_order_fields(struct cfg *c);
/* Publishes the outbox while it holds the relay lock; returns the exit status:
 * 0 when stopped, CV_EXIT_CONFIG when the database or the events broker refuses
 * the configuration (logged). Other failures are retried with backoff. */
int relay_run(const struct cfg *cfg);
/* Publishes due parked commands and fires the schedules while it holds the
 * timekeeper lock (timekeeper.c); returns the exit status as relay_run. */
int timekeeper_run(const struct cfg *cfg);
/* Moves the laned RabbitMQ queues' commands from their intakes into their
 * lanes while it holds the sorter lock (lane_sorter.c); returns the exit
 * status as relay_run. */
int lane_sorter_run(const struct cfg *cfg);
/* forwarder.c: the forwarder of cfg->producers[index] (cv-forward): one active
 * per producer database (its lock taken there), the others stand by; returns
 * the exit status as relay_run. */
int forwarder_run(const struct cfg *cfg, int index);
/* producer_types.c: writes the command types cfg routes, and
 * limits.max_message_bytes, to the producer database db (schema conveyor), in
 * one transaction; prune: and deletes the types cfg does not route (producer
 * install; a forwarder only adds: other pools may route more). Returns 0 or an
 * error class (db_errstr says why: a schema not installed). */
int producer_types_sync(struct db *db, const struct cfg *cfg, bool prune);
/* admin_producer.c: conveyor-admin producer install|status|retry (words[0] is
 * "producer"; database: --database, or NULL). Returns the exit status; says
 * what it did on stdout, what failed on stderr. */
int admin_producer(const struct cfg *cfg, char **words, int n, const char *database, bool json);
/* admin_subscriber.c: conveyor-admin subscriber install|status --database URL
 * (words[0] is "subscriber"). Returns the exit status, as admin_producer. */
int admin_subscriber(char **words, int n, const char *database, bool json);
/* admin_subscriptions.c: conveyor-admin subscriptions [list] | remove NAME |
 * dead NAME | retry NAME EVENT_ID|--all (words[0] is "subscriptions"), through
 * cfg's database and brokers. Returns the exit status: 0, 1 nothing to retry,
 * 2 usage or an unknown NAME, 3 the database or a broker could not be reached. */
int admin_subscriptions(const struct cfg *cfg, char **words, int n, bool json);
/* Whether cfg has a laned queue on RabbitMQ (then the pool runs a sorter). */
bool lane_sorter_needed(const struct cfg *cfg);
/* Redis: moves due retries back and requeues the work of dead workers; returns the
 * exit status: 0 when stopped, CV_EXIT_CONFIG when Redis refuses the configuration
 * (logged). A failed round is logged once and retried with backoff. */
int reaper_run(const struct cfg *cfg);
/* Forks and watches the pool until SIGTERM / SIGINT; returns the exit status: 0
 * once every child has exited (those still running shutdown_timeout_s later are
 * killed). SIGHUP reloads cfg->path into *cfg: a file that does not load, or a
 * RabbitMQ topology that cannot be declared, is logged and changes nothing;
 * otherwise the old *cfg is cfg_free()d and replaced (pointers into it go stale). */
int supervisor_run(struct cfg *cfg);

/* ---- scoreboard.c: the pool's counters, in memory shared by its processes ------
 * One slot per worker position, the relay and the reaper; each written by its
 * own process (relaxed stores, no lock) and by the supervisor (pid, state,
 * restarts). Read by the HTTP child (metrics.c). Every function does nothing
 * before scoreboard_init, and a process with no slot counts nothing. */
enum sb_kind { SB_WORKER, SB_RELAY, SB_REAPER };
enum sb_state { SB_DOWN, SB_STARTING, SB_IDLE, SB_BUSY, SB_RETIRED, SB_NSTATES };
enum sb_outcome { SB_APPLIED, SB_REJECTED, SB_DUPLICATE, SB_RETRIED, SB_DEAD, SB_NOUTCOMES };
/* why the supervisor restarted a child: killed by a signal, a non-zero exit, a
 * configuration refused (exit 2), recycled (max_jobs, max_rss_mb) */
enum sb_restart { SB_RESTART_SIGNAL, SB_RESTART_EXIT, SB_RESTART_CONFIG, SB_RESTART_RECYCLED, SB_NRESTARTS };
#define SB_TYPES 16             /* a queue's command types counted apart (the 16th and later: "unknown") */
#define SB_DURATION_BUCKETS 24     /* at most; sb_duration_nbounds are used */
#define SB_LATENCY_BUCKETS 18
#define SB_EVENT_TYPES 11
/* seconds, upper bounds: 0.5 ms to 10 s, then a ladder up to at least the
 * slowest queue's batch_size x statement_timeout_ms (set by scoreboard_init, fixed then) */
extern double sb_duration_bounds[SB_DURATION_BUCKETS];
extern int sb_duration_nbounds;
extern const double sb_latency_bounds[SB_LATENCY_BUCKETS];   /* seconds: 5 ms to one hour */
extern const char *const sb_event_types[SB_EVENT_TYPES];     /* events counted apart; the rest "other" */
extern const char *const sb_state_names[SB_NSTATES];
extern const char *const sb_outcome_names[SB_NOUTCOMES];
extern const char *const sb_restart_names[SB_NRESTARTS];

struct sb_type_counts {
    uint64_t outcomes[SB_NOUTCOMES];
    uint64_t duration[SB_DURATION_BUCKETS + 1]; /* not cumulative; [sb_duration_nbounds]: above every bound */
    uint64_t duration_sum_us;
};
struct sb_slot {
    /* set by the supervisor when the slot is first assigned, then fixed */
    int32_t used, kind, position, ntypes;
    char queue[CFG_NAME_MAX];
    char types[SB_TYPES][CFG_NAME_MAX];      /* the queue's command types, then "unknown" */
    int32_t taken;                            /* the supervisor's: a child of the pool owns it */
    /* written by the supervisor */
    pid_t pid;                                /* 0 while no process runs in it */
    uint64_t restarts[SB_NRESTARTS];
    /* written by the supervisor (down, starting, retired) and by its process (idle, busy) */
    int32_t state;
    /* written by its process */
    int32_t in_hand;                          /* messages the worker holds */
    struct sb_type_counts counts[SB_TYPES];
    uint64_t latency[SB_LATENCY_BUCKETS + 1]; /* createdAt to commit; not cumulative */
    uint64_t latency_sum_ms;
    uint64_t events[SB_EVENT_TYPES + 1];      /* relay: published, by type; the last "other" */
    /* the command the worker runs (its batch's first), under a sequence lock:
     * odd while written (scoreboard_current, sb_current_read) */
    uint32_t current_seq;
    char current_id[ID_LEN + 1];
    char current_type[CFG_NAME_MAX];
    /* the outcomes of the batch whose COMMIT may be in flight, and its
     * transaction (pg_current_xact_id; 0: none): counted once the commit is
     * known, by the worker or, after a kill, by the next process of the slot
     * (scoreboard_pending_*) */
    uint64_t pending_xid;
    uint32_t pending[SB_TYPES][2];            /* by type index: applied, rejected */
    /* its broker (broker_stall.c): monotonic ms; 0 when none */
    int64_t broker_wait_until_ms;             /* a reply owed is overdue after this */
    int64_t broker_silent_ms;                 /* a bound last fired on a silent broker */
    int64_t broker_answer_ms;                 /* the broker last answered */
    uint64_t broker_silences;                 /* bounds that fired on a silent broker (a counter) */
    /* a laned worker on RabbitMQ: per lane (cls * lanes + i) the createdAt,
     * ms since the epoch, of the oldest command it holds (buffered, or in its
     * batch); 0: none (scoreboard_lane_oldest) */
    int64_t lane_oldest_ms[LANE_CLASSES * LANES_MAX];
};
struct scoreboard {
    int32_t nslots;
    int32_t draining;                         /* the supervisor is stopping the pool */
    int64_t supervisor_tick_ms;               /* clock_mono_ms of the supervisor's last loop */
    struct sb_slot slot[];
};
/* Supervisor, before forking: maps the region for cfg (see the file's comment
 * for its size). Returns true, or false with errno (then nothing is counted). */
bool scoreboard_init(const struct cfg *cfg);
/* The region (read-only use), or NULL before scoreboard_init. */
const struct scoreboard *scoreboard_get(void);
/* A slot index that names no slot: the process is not counted (every function
 * taking a slot accepts it and does nothing). Not an error class. */
#define SB_NO_SLOT (-1)
/* Supervisor: a slot for a child of kind (q and position: the worker's queue
 * and index in it; q NULL otherwise): the one an exited child of that position
 * left, else a fresh one; SB_NO_SLOT before scoreboard_init or when none is
 * left (logged). */
int scoreboard_assign(enum sb_kind kind, const struct cfg_queue *q, int position);
/* Supervisor: the slot's position is no longer the pool's (a reload): retired, reusable. */
void scoreboard_release(int slot);
/* Supervisor: the slot's child is being started (state starting), and has pid. */
void scoreboard_spawning(int slot);
void scoreboard_started(int slot, pid_t pid);
/* Supervisor: pid exited; restart_reason (enum sb_restart) is counted unless
 * negative; a retired one's slot is free for a later reload. */
void scoreboard_exited(pid_t pid, int restart_reason, bool retired);
/* Supervisor: its loop ran now; and whether the pool is draining. */
void scoreboard_tick(void);
void scoreboard_set_flags(bool draining);
/* Child: from now on it writes slot (-1: none). */
void scoreboard_attach(int slot);
/* Child: its own slot (scoreboard_attach), or NULL when it has none. */
struct sb_slot *scoreboard_mine(void);
/* Worker: its state (idle, busy) and how many messages it holds. */
void scoreboard_state(enum sb_state state, int in_hand);
/* Worker: the oldest createdAt it holds per lane, ms[0..n-1] (0: none; n at
 * most LANE_CLASSES * LANES_MAX), the slot's other lanes set to none. */
void scoreboard_lane_oldest(const int64_t *ms, int n);
/* Worker: one command of type ended with outcome (retried, dead: no commit). */
void scoreboard_outcome(const char *type, enum sb_outcome outcome);
/* Worker: one command of type committed with outcome; its handler started at
 * started_us (0: did not run) and the commit ended at commit_us
 * (clock_mono_us), commit_wall_ms on the wall clock; created_ms (its
 * createdAt, envelope.created_ms; -1 when absent) gives its latency. */
void scoreboard_committed(const char *type, enum sb_outcome outcome, int64_t started_us, int64_t commit_us,
                          int64_t created_ms, int64_t commit_wall_ms);
/* Relay: one event of type published. */
void scoreboard_event_published(const char *type);
/* Worker, before a batch's COMMIT is sent: scoreboard_pending_begin, one
 * scoreboard_pending_add per command it applied or rejected (outcome
 * SB_APPLIED or SB_REJECTED; others are ignored), then scoreboard_pending_arm
 * with the transaction's id. Until scoreboard_pending_drop or _fold, the
 * slot holds them: a worker killed before it counts a commit leaves them to
 * the next process of its slot, which asks the database whether that
 * transaction committed (worker.c, count_reconcile) and folds them in or
 * drops them. */
void scoreboard_pending_begin(void);
void scoreboard_pending_add(const char *type, enum sb_outcome outcome);
void scoreboard_pending_arm(uint64_t xid);
/* The transaction of the slot's pending outcomes, or 0 when none. */
uint64_t scoreboard_pending_xid(void);
/* Forgets the pending outcomes (counted already with scoreboard_committed, or not committed). */
void scoreboard_pending_drop(void);
/* Adds the pending outcomes to the slot's counts (their transaction
 * committed; no histogram observation: their times died with the worker), then forgets them. */
void scoreboard_pending_fold(void);
/* Reader: true when s is a worker slot of queue q. */
bool sb_is_worker_of(const struct sb_slot *s, const struct cfg_queue *q);
/* What every process that ever ran a worker of a queue counted, summed. */
struct sb_queue_totals {
    uint64_t outcomes[SB_NOUTCOMES];
    uint64_t latency[SB_LATENCY_BUCKETS + 1]; /* not cumulative */
    uint64_t latency_sum_ms;
    long in_hand;
};
/* Reader: the totals of q's worker slots into *out (zeroed first; all 0 before scoreboard_init). */
void sb_queue_totals(const struct cfg_queue *q, struct sb_queue_totals *out);
/* Reader: per lane of q (out[cls * q->lanes + i], LANE_CLASSES * q->lanes
 * entries, zeroed first) the oldest createdAt (ms) its running workers hold; 0: none. */
void sb_queue_lane_oldest(const struct cfg_queue *q, int64_t *out);
/* The resident size of process pid in bytes (/proc) into *bytes: true, or false
 * (*bytes untouched) when it cannot be read. */
bool sb_resident_bytes(pid_t pid, long long *bytes);
/* ---- broker_stall.c: a broker that does not answer, seen from the pool ---- */
/* Child (scoreboard_attach calls it): the process's broker_note calls go to
 * slot (broker_stall_hook); NULL: nowhere. */
struct sb_slot;
void broker_stall_attach(struct sb_slot *slot);
/* Reader: how many of the pool's processes (workers, the relay, the reaper)
 * using transport t are stalled on their broker now: a reply owed for longer
 * than its budget plus STALL_GRACE_MS; or a bound that fired on a silent
 * broker (broker.reply_timeout_ms) less than STALL_SHOW_MS ago (shown that
 * long even when the process moved on at once), or less than twice that
 * timeout ago with no answer since. who (n bytes, may be NULL) names the first
 * such process ("relay", "worker of catalog"), "" when none. */
#define STALL_GRACE_MS 2000
#define STALL_SHOW_MS 5000
int broker_stalled_count(const struct cfg *cfg, enum transport t, char *who, size_t n);
/* Reader: the bounds that fired on a silent broker of transport t, summed
 * over the pool's slots (every process that ran in them). */
uint64_t broker_silences_total(const struct cfg *cfg, enum transport t);

/* Worker: it runs command id of type now (NULL: none). */
void scoreboard_current(const char *id, const char *type);
/* Reader: the command slot s runs into id and type ("" when none). Returns
 * false when none (or a torn read three times over). */
bool sb_current_read(const struct sb_slot *s, char id[ID_LEN + 1], char type[CFG_NAME_MAX]);

/* ---- http/http.c: the pool's HTTP listener (the rest of it: http/http.h) ------- */
/* The child that serves http.listen (cfg->http_listen): /livez, /readyz, /metrics.
 * Returns the exit status: 0 when stopped, 1 when it cannot listen (logged). */
int http_run(const struct cfg *cfg);

/* ---- relay_wake.c: a worker wakes the pool's own relay (a shared page, an eventfd) */
/* Supervisor, before forking: true, or false with errno when the system refused (workers then NOTIFY). */
bool relay_wake_init(void);
/* Relay: it holds (true) or gave up (false) the relay lock. */
void relay_wake_set_active(bool active);
/* Supervisor: pid exited; if it was the active relay, there is none now. */
void relay_wake_forget(pid_t pid);
/* Worker: true when the pool's own relay is the active one (else NOTIFY). */
bool relay_wake_is_local(void);
/* Worker, after a commit with events: wakes the pool's relay. */
void relay_wake_signal(void);
/* Relay: the descriptor to poll for wake-ups (-1 when none), and drain it. */
int relay_wake_fd(void);
void relay_wake_clear(void);

/* ---- queue_pause.c: queues paused from the terminal (table queue_state) -------- */
/* ---- breaker.c: the database breaker, one per pool ------------------------------
 * closed (workers take), open (they hand back what they hold uncounted and take
 * nothing), half-open (one worker probes with one command). The numbers are
 * conveyor_breaker_state's. */
enum breaker_state { BREAKER_CLOSED = 0, BREAKER_HALF_OPEN = 1, BREAKER_OPEN = 2 };
/* What a worker about to take may do: take (closed), probe (this process holds
 * the half-open probe: one command), or wait (taking nothing). */
enum breaker_turn { BREAKER_TAKE, BREAKER_PROBE, BREAKER_WAIT };
/* Supervisor's parent (main.c), before forking: maps the pool's breaker page.
 * True, or false when the system refused (each process then has its own). */
bool breaker_init(void);
/* A worker saw the database fail (why: its message, for the log and /readyz):
 * closed, counts one consecutive failure and opens at cfg->breaker_failures;
 * half-open and this process's probe, opens again with a longer backoff;
 * else nothing. Logs the transition it makes. */
void breaker_failure(const struct cfg *cfg, const char *why);
/* A worker's batch (or the probe's statement) went through: clears the count
 * of failures; half-open and this process's probe, closes (logged). */
void breaker_success(void);
/* Whether this worker may take now (enum breaker_turn); claims the probe, and
 * logs it, when the open breaker's backoff is over (or a probe was abandoned). */
enum breaker_turn breaker_turn(void);
/* The state, with a sentence for /readyz in why (n bytes; may be NULL) and the
 * times it opened in *opens (may be NULL). */
enum breaker_state breaker_read(char *why, size_t n, uint64_t *opens);
/* After a failed statement or connection on db (NULL: none): true when it is
 * the database's failure (no connection; SQLSTATE 08xxx, 53300, 57P01, 57P02,
 * 57P03), false when it is the command's own (a timeout, a serialization
 * failure, a deadlock, a refusal). */
bool breaker_dependency_failed(const struct db *db);

/* Supervisor, before forking: maps the page through which every process of the
 * pool sees the paused set. True, or false when the system refused (each
 * process then reads the table for itself). */
bool queue_pause_init(void);
/* Reads the paused set from db into the page when the page is older than
 * 400 ms and no other process of the pool is reading it. Returns 0, or the
 * error class of the query (logged; the set last read stays). */
int queue_pause_refresh(struct db *db);
/* True when q is paused, as last read (false before the first read). For the
 * metrics: conveyor_queue_paused{queue} is 1 when true. Reads the page only. */
bool queue_paused(const struct cfg_queue *q);
/* True once the pool has read queue_state at least once (a refresh wrote the
 * page): before that queue_paused knows nothing, and a worker takes nothing. */
bool queue_pause_known(void);
/* Pauses (paused true) or resumes queue in queue_state, saying who did it (by)
 * and why (note, may be NULL). Returns 0 or the error class (db_exec). */
int queue_pause_set(struct db *db, const char *queue, bool paused, const char *by, const char *note);

/* ---- dead_view.c: a dead letter as an operator sees it ------------------------ */
#define DEAD_KEY_LEN 36 /* a command id, or "body-" and 16 hex digits of the body's hash */
/* The command id of d: the body's "id", else the AMQP message_id; "" if none. */
void dead_letter_command_id(const struct dead_letter *d, char out[ID_LEN + 1]);
/* The key that names d while it waits (the dashboard's actions take keys): its
 * command id, or for a message without one a hash of its body. */
void dead_letter_key(const struct dead_letter *d, char out[DEAD_KEY_LEN + 1]);
/* Seconds since d failed, or -1 when its failed_at is not RFC 3339. */
long dead_letter_age_s(const struct dead_letter *d);
/* d of queue q (index: its place in the list, from 1) as JSON (caller frees):
 * queue, index, key, commandId, type, reason, error, attempts, failedAt,
 * ageSeconds, and with message the message, its password fields "***". */
cJSON *dead_letter_json(const struct cfg_queue *q, const struct dead_letter *d, int index, bool message);
/* Before d is retried: forgets its command's attempts (a fresh count). 0, or
 * the error class of the statement (db_errstr says why). */
int dead_letter_reset_attempts(struct db *db, const struct dead_letter *d);

/* ---- pool_load.c: the pool's in-flight counts in PostgreSQL (sql/0008), and its lanes' oldest (sql/0012) */
#define POOL_LOAD_FRESH_S_TEXT "5" /* a pool's rows older than this many seconds are not counted */
/* Relay (active or standing by), as often as it likes: at most once a second
 * writes what this pool's workers hold per queue (the scoreboard's in_hand)
 * into pool_in_flight, and per lane the oldest createdAt they hold
 * (sb_queue_lane_oldest) into lane_oldest. A failure is logged at debug (the
 * rows go stale). */
void pool_load_report(struct db *db, const struct cfg *cfg);
/* At a clean stop: deletes this pool's rows (best effort). */
void pool_load_forget(struct db *db);
/* conveyor-admin stats: in_flight[i] (cfg->nqueues entries) is the sum over
 * the pools with fresh rows of what their workers hold of queue i. Returns 0
 * or the error class (42P01: the schema is older). */
int pool_load_read(struct db *db, const struct cfg *cfg, long *in_flight);
/* The laned queue q on RabbitMQ: each lane's oldest age, from the fresh
 * lane_oldest rows of every pool (the oldest createdAt a pool's workers hold
 * of it, aged by the database's clock), into out[cls * q->lanes + i]
 * .oldest_age_s; a lane without one keeps its value. Returns 0 or a class. */
int pool_load_lane_ages(struct db *db, const struct cfg_queue *q, struct lane_count *out);

/* ---- dead_index.c: RabbitMQ's dead letters indexed in PostgreSQL (sql/0007) ---- */
/* After the broker confirmed the dead letter of d (dead_id its
 * x-conveyor-dead-id header): its row in the index of q. 0, or the error
 * class of the insert (db_errstr says why; the index is then one short, and
 * its next reader rebuilds it). */
int dead_index_add(struct db *db, const struct cfg_queue *q, const char *dead_id, const struct delivery *d,
                   const char *reason, const char *error, int attempts);
/* After d was taken off q's dead-letter queue (retry, purge): deletes its row
 * (by its dead_id, else one row with its key and no dead_id). 0 or the error
 * class (a row left behind is found by the next reader's check). */
int dead_index_forget(struct db *db, const struct cfg_queue *q, const struct dead_letter *d);
/* Before reading q's index: the queue's dead letters into *total (one passive
 * declare) against the index's row count (one row). When they differ, looks
 * again 200 ms later: a difference that moved is letters coming in (the index
 * is read as it is); one that stayed is a drift, and q's rows are rebuilt from
 * the queue (a walk that takes nothing) in one transaction under a lock per
 * queue. Returns 0 (read the index), 1 (rebuilt), or an error class with err. */
int dead_index_sync(struct db *db, struct broker *b, const struct cfg_queue *q, long *total, char *err,
                    size_t errlen);
/* Up to limit rows of q with id > after_id, skipping offset of them, in id
 * order: *out (dead_letters_free(*out, *n)) and their ids in *ids (free()),
 * both set (maybe empty) on success. 0 or the error class. */
int dead_index_page(struct db *db, const struct cfg_queue *q, long long after_id, long offset, int limit,
                    struct dead_letter **out, long long **ids, int *n);
/* The rows of q whose key is key, in id order, and each one's number in the
 * list (from 1) in *numbers (free()). 0 or the error class. */
int dead_index_find(struct db *db, const struct cfg_queue *q, const char *key, struct dead_letter **out,
                    long **numbers, int *n);

/* broker_dead_take of the letters of q that sel chooses (remove, with requeue
 * publish again first); then, for RabbitMQ with db, deletes the rows of the
 * letters sel chose (a failure is logged: the next reader's check repairs
 * it). Returns as broker_dead_take. */
int dead_index_take(struct broker *b, struct db *db, const struct cfg_queue *q, dead_select_fn sel, void *arg,
                    bool requeue, int *count);

/* ---- dead_page.c: a page of dead letters, on either transport, none taken ----- */
#define DEAD_PAGE_MAX 1000     /* the largest page */
#define DEAD_PAGE_DEFAULT 100  /* conveyor-admin dead list without --limit */
struct dead_page {
    struct dead_letter *d; /* n letters, oldest first */
    long *number;          /* each one's place in the list, from 1 */
    int n;
    long total;            /* the queue's dead letters, as its broker counts them (the truth) */
    long offset;           /* letters before this page */
    char next[48];         /* the cursor of the next page, "" when this is the last */
    bool rebuilt;          /* RabbitMQ: the index disagreed with the queue and was rebuilt first */
};
/* Frees what a page holds and zeroes it; NULL is fine. */
void dead_page_free(struct dead_page *p);
/* The page of q's dead letters that cursor (NULL or "": the first) starts,
 * at most limit (1..DEAD_PAGE_MAX) letters, into *out (dead_page_free it).
 * b is q's transport's broker; db the database (RabbitMQ's index: needed
 * there, may be NULL for Redis). Returns 0, or an error class with err set:
 * CV_EREJECT for a bad limit or cursor, else the broker's or the database's. */
int dead_page_read(struct broker *b, struct db *db, const struct cfg_queue *q, const char *cursor, int limit,
                   struct dead_page *out, char *err, size_t errlen);
/* The dead letters of q whose key is key (number 0), or the number-th of the
 * list (number > 0), into *out, as dead_page_read. No match: 0 with out->n 0. */
int dead_page_find(struct broker *b, struct db *db, const struct cfg_queue *q, const char *key, long number,
                   struct dead_page *out, char *err, size_t errlen);

/* ---- parked_view.c: the parked commands as an operator sees them (sql/0010) ---- */
#define PARKED_PAGE_MAX 1000    /* the largest page */
#define PARKED_PAGE_DEFAULT 100 /* conveyor-admin scheduled list without --limit */
/* A queue's parked commands: how many, and when the first is due. */
struct parked_queue_stat {
    long count;
    char next_due[32]; /* RFC 3339 UTC; "" when none */
    double next_due_s; /* unix seconds; 0 when none */
};
/* The parked commands of every queue of cfg into out (cfg->nqueues entries,
 * in cfg order, zeroed first: a queue with none is 0): one statement, an
 * index-only walk of parked_commands_queue per queue. 0 or the error class. */
int parked_counts(struct db *db, const struct cfg *cfg, struct parked_queue_stat *out);
/* A parked command as a page shows it (its message is not read). */
struct parked_row {
    char id[ID_LEN + 1];
    char queue[CFG_NAME_MAX], type[CFG_NAME_MAX];
    char reason[16];              /* delayed | schedule */
    char schedule[CFG_NAME_MAX];  /* reason schedule: which one; else "" */
    char due_at[32], parked_at[32]; /* RFC 3339 UTC, milliseconds */
};
struct parked_page {
    struct parked_row *rows; /* n rows, by due time, then id */
    int n;
    char next[96];           /* the cursor of the next page, "" when this is the last */
};
/* Frees what a page holds and zeroes it; NULL is fine. */
void parked_page_free(struct parked_page *p);
/* The page of parked commands (of queue only, or of all when NULL) that
 * cursor (NULL or "": the first) starts, at most limit (1..PARKED_PAGE_MAX)
 * rows, ordered by due_at then id, into *out (parked_page_free it). Returns
 * 0, or an error class with err: CV_EREJECT for a bad limit or cursor. */
int parked_page_read(struct db *db, const char *queue, const char *cursor, int limit, struct parked_page *out,
                     char *err, size_t errlen);
/* A row as JSON (caller frees): id, queue, type, reason, schedule (or null), dueAt, parkedAt. */
cJSON *parked_row_json(const struct parked_row *row);
/* What a cancel found: the command parked and now cancelled; not parked but
 * processed already (its outcome and when); or neither (unknown, or on its
 * way in a queue: published by the timekeeper, not taken yet). */
enum parked_cancel_outcome { PARKED_NOT_FOUND, PARKED_ALREADY_RAN, PARKED_CANCELLED };
struct parked_cancel {
    enum parked_cancel_outcome outcome;
    char queue[CFG_NAME_MAX];    /* cancelled: the queue it waited for */
    char type[CFG_NAME_MAX];     /* cancelled or already ran: its type */
    char event_id[ID_LEN + 1];   /* cancelled: its command.rejected event */
    char ran_outcome[16];        /* already ran: applied | rejected */
    char processed_at[32];       /* already ran: when (RFC 3339 UTC) */
};
/* Cancels parked command id (lower case) in one transaction (lock_timeout
 * 3 s): deletes its row; inserts processed_commands (id, type, 'rejected')
 * and, that row being new, one command.rejected event {code CANCELLED,
 * message "cancelled by an operator before its time"} (ctx_emit_rejection,
 * with the stored message's correlationId and trace) into the outbox, and
 * NOTIFY "<prefix>_outbox"; commits. A command processed meanwhile (taken
 * between the timekeeper's publish and its delete) is left as it is
 * (already ran). Returns 0 with *out saying which, or an error class
 * (CV_ERETRY: the database is away, or the row stayed locked 3 s; nothing
 * changed). */
int parked_cancel(struct db *db, const struct cfg *cfg, const char *id, struct parked_cancel *out);

/* ---- schedule_view.c: the schedules as an operator sees them (sql/0010) -------- */
/* A schedule of the configuration and its row of the schedules table. */
struct schedule_state {
    const struct cfg_schedule *s; /* its configuration (points into the cfg read) */
    bool has_row;                 /* the table has a row for it (it fired or was paused once) */
    bool paused;
    char last_slot[SLOT_KEY_MAX]; /* the key of the last slot fired or skipped; "" when none */
    char last_slot_at[32];        /* that slot's instant, RFC 3339 UTC; "" when none */
    double last_slot_s;           /* the same in unix seconds; 0 when none */
    char last_command_id[ID_LEN + 1]; /* the last fired slot's command; "" when none */
    char last_outcome[16];        /* its processed_commands outcome, "pending" when not processed yet; "" when none */
    char next_slot_at[32];        /* the next slot's instant as the timekeeper last computed it; "" when unknown */
    long long fired, missed, runs;
    char updated_at[32], updated_by[160]; /* who paused or resumed it last, when; "" when nobody */
};
/* Every schedule of cfg into out (cfg->nschedules entries, in cfg order),
 * each joined with its row when it has one (a row of a schedule no longer
 * configured is left out). Returns 0 or the error class. */
int schedule_states_read(struct db *db, const struct cfg *cfg, struct schedule_state *out);
/* Pauses (paused true) or resumes schedule name, saying who did it (by):
 * upserts its row (updated_at now). Returns 0, CV_EREJECT when cfg has no
 * schedule called name, or the error class of the statement. */
int schedule_pause_set(struct db *db, const struct cfg *cfg, const char *name, bool paused, const char *by);
/* st as JSON (caller frees): name, type, kind (cron | every), cron, timezone,
 * everySeconds, catchUp, paused, nextSlotAt, lastSlot, lastSlotAt,
 * lastCommandId, lastOutcome, fired, missed, runs, changedAt, changedBy
 * (null where not known). */
cJSON *schedule_state_json(const struct schedule_state *st);

/* ---- admin_scheduled.c: conveyor-admin scheduled and schedules -------------------- */
/* conveyor-admin's exit statuses besides 0 (README, "Exit status"). */
enum { EXIT_NONE = 1, EXIT_USAGE = 2, EXIT_UNREACHABLE = 3 };
/* conveyor-admin's exit status for a failure of class cls (the README's "Exit
 * status"): 3 for what may pass by itself (CV_ERETRY, CV_ETIMEOUT: a server
 * lost or silent), 2 for the rest (a refused login, permission, certificate or
 * request: configuration). Here, so that admin.c and admin_scheduled.c share it
 * without calling each other. */
static inline int exit_of_class(int cls) {
    return cls == CV_ERETRY || cls == CV_ETIMEOUT ? EXIT_UNREACHABLE : EXIT_USAGE;
}
/* Each prints its answer on stdout (--json: one JSON object per line) and
 * why it failed on stderr, through db (borrowed, open), and returns
 * conveyor-admin's exit status.
 * scheduled list [QUEUE]: the parked count and next due time of every queue
 * (or QUEUE's), then a page (cursor, limit) of the parked commands; the next
 * page's --cursor on stderr (--json: nextCursor on the last row). */
int admin_scheduled_list(struct db *db, const struct cfg *cfg, const char *queue, const char *cursor, int limit,
                         bool json);
/* scheduled cancel ID (by: user@host, for the log): 0 cancelled, 1 not parked
 * (already ran, or unknown: said which), 3 the database failed. */
int admin_scheduled_cancel(struct db *db, const struct cfg *cfg, const char *id, const char *by, bool json);
/* schedules [list]: every configured schedule and its state. */
int admin_schedules_list(struct db *db, const struct cfg *cfg, bool json);
/* schedules pause|resume NAME (by: user@host): 0, 2 an unknown NAME, 3 the database failed. */
int admin_schedules_pause(struct db *db, const struct cfg *cfg, const char *name, bool pause, const char *by);
/* schedules run NAME (by: user@host): one run now; prints its command id. 0, 2 an unknown NAME, 3 the database failed. */
int admin_schedules_run(struct db *db, const struct cfg *cfg, const char *name, const char *by, bool json);

/* ---- dedup_prune.c: the dedup table's window ------------------------------------ */
/* Deletes processed_commands rows older than cfg->dedup_retention_days (0:
 * keeps them all) in batches of cfg->dedup_prune_batch, each its own
 * statement, until one deletes fewer than a batch or budget_ms have passed.
 * Returns the rows deleted (a failed batch, logged, ends the pass: the rows of
 * the batches before it are counted and said), or the error class when the
 * first batch failed. */
long dedup_prune(struct db *db, const struct cfg *cfg, int budget_ms);

#endif
