/*
 * core.h - the one internal header of Conveyor's shared library.
 *
 * Conventions (docs/architecture.md): functions return 0 or a negative CV_E* code
 * (or a count >= 0, or a class); pointer returns are NULL on failure; a yes/no
 * is a bool, and what is not an error has an enum of its own: never a bare -1,
 * which is CV_ERETRY (test_architecture.test_one_error_channel); x_free(NULL) is a no-op; every
 * prototype says who owns what it returns. Errors carry a class (retry,
 * reject, dead, refused, config: the table below) so callers decide ack /
 * retry / dead-letter / stop from the code, never from message text.
 */
#ifndef CONVEYOR_CORE_H
#define CONVEYOR_CORE_H

#include <stdbool.h>
#include <stddef.h>
#include <signal.h> /* sig_atomic_t */
#include <stdint.h>
#include <cjson/cJSON.h>
#include <libpq-fe.h>

/* ---- error classes ------------------------------------------------------
 * Every function that can fail returns one of these; callers decide from the
 * class alone, never from message text. What the worker does with a command
 * whose processing ended in each; the test of each row, on both transports:
 * CV_ERETRY test_recovery.test_transient_failure_is_retried and
 * test_retries_exhausted_then_admin_retry; CV_EREJECT test_commands (every
 * rejection); CV_EDEAD test_failures.test_invalid_messages_are_dead_lettered;
 * CV_EREFUSED test_recovery.test_unanticipated_database_error_is_dead_lettered_at_once;
 * CV_ECONFIG test_config (all of it):
 *
 *   class        meaning                                   worker
 *   CV_ERETRY    transient: connection lost, serialization  broker delay, backoff 1 s doubling to
 *                failure, deadlock, lock or statement        5 min; after max_attempts dead letter
 *                timeout, server shutting down              retries_exhausted
 *   CV_EREJECT   the command breaks a rule                  command.rejected event, ack
 *   CV_EDEAD     the message cannot be processed at all     dead letter invalid_envelope or
 *                (not an envelope, unknown type)            unknown_command, at once
 *   CV_EREFUSED  the server refused the request and would   dead letter handler_error at once, with
 *                refuse it again: a constraint violation,   the SQLSTATE and the constraint (retry it
 *                any database error the handler did not     with conveyor-admin after the fix); the
 *                anticipate, an unroutable message          batch's other commands go on
 *   CV_ECONFIG   a setting is wrong: unparsable URL,        the process stops, exit 2 (never retried)
 *                unknown scheme, credentials refused
 *   CV_ETIMEOUT  nothing arrived in time (not a failure)    -
 *   CV_EFULL     a bounded queue (max_length) is full: the   - (a worker never publishes a new command;
 *                command was refused, not taken              the producer says so, the timekeeper keeps
 *                                                           it parked)
 */
enum {
    CV_OK = 0,
    CV_ERETRY = -1,
    CV_EREJECT = -2,
    CV_EDEAD = -3,
    CV_EREFUSED = -4,
    CV_ETIMEOUT = -5,
    CV_ECONFIG = -6,
    CV_EFULL = -7,
};
/* The name of a class (of every one above: keep them together), "ok" for CV_OK;
 * a static string, never NULL ("unknown error" for any other value: a bug). */
static inline const char *cv_strerror(int code) {
    switch (code) {
    case CV_OK: return "ok";
    case CV_ERETRY: return "transient failure";
    case CV_EREJECT: return "rejected";
    case CV_EDEAD: return "not processable";
    case CV_EREFUSED: return "refused";
    case CV_ETIMEOUT: return "timed out";
    case CV_ECONFIG: return "configuration error";
    case CV_EFULL: return "queue full";
    default: return "unknown error";
    }
}
/* The exit status of a process stopped by CV_ECONFIG (conveyor-workers at start, or one of its children). */
#define CV_EXIT_CONFIG 2

/* ---- log.c: one JSON object per line on stderr ----------------------------- */
enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };
/* Names the process in every line ("supervisor", "worker", ...): component is
 * kept, not copied (a static string). Reads the level from CONVEYOR_LOG_LEVEL
 * (debug|info|warn|error; default info; any other value is ignored). */
void log_init(const char *component);
/* The name given to log_init ("conveyor" before). */
const char *log_component(void);
/* command_id may be NULL. Never pass a password, a hash or a payload. The
 * message is cut at 2047 bytes; a line that cannot be built or written is lost. */
void log_msg(enum log_level level, const char *command_id, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
struct envelope;
/* As log_msg, about command cmd (may be NULL: then no command fields): the line
 * carries its commandId, and its traceId when the command has a trace context. */
void log_cmd(enum log_level level, const struct envelope *cmd, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
#define log_info(...) log_msg(LOG_INFO, NULL, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, NULL, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, NULL, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_DEBUG, NULL, __VA_ARGS__)

/* ---- alloc.c: allocations that do not fail ----------------------------------- */
/* As malloc, calloc, realloc, strdup and strndup, for small allocations on
 * paths that have no error to return (a configuration string, a batch's
 * bookkeeping, a message's copy): when the memory cannot be had they log
 * "out of memory" (if that line can still be written) and abort(), so they
 * never return NULL. A worker that aborts holds no acked message: the
 * supervisor starts another and the broker hands its messages out again. A
 * function that can return an error class uses malloc and returns it
 * instead. The caller frees the result. */
void *xmalloc(size_t size);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t size); /* like realloc: p may move; never NULL */
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

/* ---- lane.c: lanes (docs/contract.md, "Lanes") -----------------------------
 * A queue with lanes = N >= 2 is split, per priority class, into N lanes; a
 * command goes to the lane its lane key hashes to: its fairnessKey, else its
 * ordering key (orderingKey, else the payload field that names its aggregate),
 * else its id (no order to keep). Workers take high before normal before low,
 * with a guard (LANE_GUARD_*), round-robin across lanes within a class. */
enum lane_class { LANE_HIGH = 0, LANE_NORMAL = 1, LANE_LOW = 2 };
#define LANE_CLASSES 3
#define LANES_MAX 64            /* lanes per class of one queue */
#define LANE_KEY_CHARS 200      /* fairnessKey, orderingKey: at most this many characters */
#define LANE_KEY_MAX 256        /* a lane key's bytes with its NUL (a longer one is hashed: lane_route) */
/* The guard against starvation: of the takes of a worker, every
 * LANE_GUARD_LOW-th looks at low first, every LANE_GUARD_NORMAL-th (the
 * others) normal first: under a constant high load, low and normal each get
 * at least one take in LANE_GUARD_LOW. */
#define LANE_GUARD_LOW 8
#define LANE_GUARD_NORMAL 4
/* "high", "normal", "low" (static); "normal" for anything else. */
const char *lane_class_name(int cls);
/* The name of lane k of a queue with `lanes` lanes per class (k = cls * lanes
 * + i, the order of broker_lane_counts): "<class>.<i>", as /metrics, stats and
 * lane_oldest name it, into out (n bytes). Returns out. */
const char *lane_label(int lanes, int k, char *out, size_t n);
/* The class named s into *cls: true, or false (*cls untouched) for anything else. */
bool lane_class_parse(const char *s, int *cls);
/* The order in which take number n (0, 1, ...) looks at the classes, written
 * to order[0..2]: high, normal, low, but low first on every LANE_GUARD_LOW-th
 * and normal first on every other LANE_GUARD_NORMAL-th. */
void lane_take_order(unsigned long n, int order[LANE_CLASSES]);
/* Where a laned command goes, read from its body (no full envelope check: a
 * body that is not a JSON object goes to class normal with key "" and is
 * dead-lettered by its worker as ever). */
struct lane_route {
    int cls;                    /* enum lane_class */
    char key[LANE_KEY_MAX];     /* the lane key: fairnessKey, else the ordering key, else the id, else "" */
    int64_t created_ms;         /* its createdAt, ms since the epoch; 0 when it has none valid */
};
struct cfg_queue;
/* Fills *out for the command in body (len bytes) of queue q (its
 * order_fields name the payload field of each type); fallback_id (a RabbitMQ
 * message_id, may be NULL) stands for a body without an id. A key longer than
 * LANE_KEY_MAX - 1 bytes is replaced by its hash in hex. Cannot fail. */
void lane_route(const struct cfg_queue *q, const char *body, size_t len, const char *fallback_id,
                struct lane_route *out);
struct envelope;
/* The ordering key of a parsed command of q into out (n bytes): its
 * orderingKey, else the text of its payload's aggregate field (a string or an
 * integer), else "" (no key: nothing to keep in order). Returns out. */
const char *lane_order_key(const struct cfg_queue *q, const struct envelope *e, char *out, size_t n);

/* ---- cfg.c: queues.conf ---------------------------------------------------- */
enum transport { TRANSPORT_RABBITMQ, TRANSPORT_REDIS };
/* A static string: "redis" for TRANSPORT_REDIS, else "rabbitmq". */
const char *transport_name(enum transport t);
/* "rabbitmq" or "redis" into *t; returns true, or false (*t untouched) for anything else. */
bool transport_parse(const char *s, enum transport *t);

#define CFG_NAME_MAX 64
struct cfg_queue {
    char name[CFG_NAME_MAX];
    enum transport transport;
    int workers;         /* processes for this queue */
    int prefetch;        /* RabbitMQ basic.qos */
    int max_attempts;    /* handler starts before a message is dead-lettered (retries_exhausted) */
    int batch_size;      /* messages already delivered that a worker runs in one transaction */
    bool quorum;         /* RabbitMQ queue type: quorum (default) or classic */
    /* PostgreSQL limits of the worker's session, so no transaction holds its
     * messages for ever: a longer statement, lock wait or pause inside a
     * transaction fails (a transient failure, retried) */
    int statement_timeout_ms;           /* statement_timeout */
    int lock_timeout_ms;                /* lock_timeout (0: only statement_timeout bounds a lock wait) */
    int idle_in_transaction_timeout_ms; /* idle_in_transaction_session_timeout (the session is ended) */
    long max_length;     /* bounded queue: a new command is refused (CV_EFULL) while the queue holds this
                          * many waiting; 0: unbounded (docs/decisions.md, "Bounded queues") */
    char **commands;     /* command types routed here, owned by the cfg */
    int ncommands;
    /* lanes (docs/contract.md, "Lanes"): 1, no lanes (the queue as it always
     * was); N >= 2: each priority class split into N lanes by the lane key */
    int lanes;
    bool ordered;        /* commands of one ordering key applied in the order the broker received them
                          * (lanes >= 2): one consumer per lane at a time, a retrying command holds its key */
    /* parallel to commands: the payload field naming the aggregate a command
     * acts on (its default ordering key), or NULL; set by the pool from the
     * domain's table (cfg_set_order_field), NULL in a producer */
    const char **order_fields;
};

/* ---- cron.c: cron expressions ------------------------------------------------
 * Five fields (minute hour day-of-month month day-of-week) or six (a seconds
 * field first); each `*`, a number, a range a-b, a list a,b,c, a step (star)/n or
 * a-b/n; months JAN-DEC and days SUN-SAT by name too (any case); day of week
 * 0-7 (0 and 7: Sunday). When both day fields are restricted, a day matches
 * when either does (Vixie cron's rule). Times are local wall times written as
 * "naive" seconds: timegm() of the wall clock's fields (no zone involved). */
struct cron {
    uint64_t seconds, minutes; /* bit n: second / minute n */
    uint32_t hours, mdays;     /* bit n: hour n; day of month n (1-31) */
    uint16_t months;           /* bit n: month n (1-12) */
    uint8_t wdays;             /* bit n: day of week n (0 Sunday - 6) */
    bool mday_any, wday_any;   /* the field was `*` (or `?`) */
    bool with_seconds;         /* six fields */
};
/* Parses expr into *out: 0, or CV_ECONFIG with why (which field, what is wrong). */
int cron_parse(const char *expr, struct cron *out, char *why, size_t n);
/* The first wall time (naive seconds) strictly after `after` that c matches,
 * or -1 (CRON_NONE) when none comes within 5 years (e.g. "0 0 30 2 *"). */
#define CRON_NONE ((int64_t)-1)
int64_t cron_next(const struct cron *c, int64_t after);

/* A schedule of queues.conf (`schedules`): fires the command type with payload
 * once per slot (shared/schedule.c). */
enum schedule_kind { SCHEDULE_CRON, SCHEDULE_EVERY };
enum catch_up { CATCH_UP_NONE, CATCH_UP_LAST, CATCH_UP_ALL };
struct cfg_schedule {
    char name[CFG_NAME_MAX];
    enum schedule_kind kind;
    char *cron_text;           /* cron: the expression as written (owned) */
    struct cron cron;          /* cron: parsed */
    char timezone[64];         /* cron: an IANA zone name of the system's tz data; "UTC" by default */
    int64_t every_s;           /* every: the interval in seconds (>= 1); slots at multiples of it since the epoch */
    char type[CFG_NAME_MAX];   /* a command type some queue routes */
    char *payload;             /* a JSON object, as text; "{{slot}}" in its strings is the slot (owned) */
    enum catch_up catch_up;    /* slots found more than catch_up_window_s after their time */
    int64_t catch_up_window_s; /* a slot fired within this long after its time is on time */
};

/* A rate limit of queues.conf (`rate_limits`; shared/cfg_rate_limits.c): the
 * commands of its types applied at most `rate` per second on average and
 * `burst` at once, one bucket per value of key when it has one; counted on
 * committed work (workers/rate_limit.c, docs/decisions.md "Rate limits"). */
enum rate_over { RATE_OVER_WAIT, RATE_OVER_REJECT };
#define RATE_SHARDS_MAX 64
#define RATE_BUCKET_MAX 130 /* a bucket name: a key value of up to 128 bytes, or "h:" and its hash */
struct cfg_rate_limit {
    char name[CFG_NAME_MAX];
    char queue[CFG_NAME_MAX]; /* given as `queue`: its name ("" when given as `types`) */
    char **types;             /* the command types it counts (a queue's commands) (owned) */
    int ntypes;
    double rate;              /* tokens per second (> 0) */
    char rate_text[32];       /* as written: "100/s", "6000/min", "10/h" */
    double burst;             /* the bucket's size: at most this many at once (>= 1) */
    char *key;                /* the field path inside the payload ("customerId", "a.b") (owned); NULL: one bucket */
    enum rate_over over;      /* what a command finds when no token is left: it waits (parked) or is rejected */
    int shards;               /* rows one bucket is split into (1 .. RATE_SHARDS_MAX, at most burst) */
};

/* A producer database of queues.conf (`producers`): its own PostgreSQL, where
 * conveyor-admin producer install put schema `conveyor` (conveyor.outbound,
 * conveyor.enqueue); each pool runs a forwarder (workers/forwarder.c) per producer. */
struct cfg_producer {
    char name[CFG_NAME_MAX]; /* the metrics' label: `name`, or the URL's database name */
    char *url;               /* a libpq URL (owned); never printed unredacted */
};

struct cfg {
    char *path;               /* the file it was read from */
    char *prefix;             /* "conveyor": exchange, queue and key names */
    char *database_url;
    char *rabbitmq_url;
    char *rabbitmq_ca_file;   /* amqps: CA certificates (PEM) that verify the broker; NULL: the system's */
    char *rabbitmq_cert_file; /* amqps: client certificate (PEM), with rabbitmq_key_file; NULL: none */
    char *rabbitmq_key_file;
    char *rabbitmq_management_url; /* rabbitmq.management_url: the management plugin's HTTP API, where
                                    * conveyor-workers sets the bounded queues' policies; NULL: none */
    char *redis_url;
    enum transport events_transport;
    long events_maxlen;       /* Redis stream MAXLEN ~ */
    long max_message_bytes;   /* a larger command is dead-lettered */
    int stock_low_threshold;  /* stock.low fires at or below this */
    int relay_poll_ms;        /* safety-net poll when no NOTIFY arrives */
    int relay_batch;          /* outbox rows claimed at once */
    long outbox_retention_s;  /* published rows older than this are pruned */
    int dedup_retention_days; /* processed_commands rows older than this are pruned (0: never); a replay
                               * of a pruned command id is applied again */
    int dedup_prune_batch;    /* rows deleted per statement while pruning */
    int shutdown_timeout_s;   /* SIGTERM: time given to in-flight work */
    int max_jobs;             /* a worker is recycled after this many commands (0: never) */
    int max_rss_mb;           /* ... or above this resident size (0: never) */
    int retry_base_ms;        /* backoff of the first retry; doubles per attempt */
    int retry_max_ms;         /* cap of the backoff */
    /* the database breaker (workers/breaker.c; the group breaker): it opens after
     * breaker_failures consecutive failures of the database, and a probe is tried
     * breaker_backoff_ms after it opened, doubling per failed probe up to
     * breaker_max_backoff_ms */
    int breaker_failures;
    int breaker_backoff_ms;
    int breaker_max_backoff_ms;
    int heartbeat_interval_s; /* Redis worker heartbeat refresh */
    int heartbeat_ttl_s;      /* Redis heartbeat expiry: then the reaper requeues in-flight work */
    int redis_wait_replicas;  /* Redis: a publish is confirmed once this many replicas have it (WAIT); 0: at once */
    int redis_wait_timeout_ms; /* ... within this long (at most 25 s: below a Redis reply's 30 s read
                                * timeout), else it is not confirmed (sent again: a copy) */
    int publish_retry_ms;     /* the C client: how long a publish the broker did not confirm is sent again */
    long spool_max_bytes;     /* the C client's offline spool (conveyor_set_spool): the most its file may hold */
    int broker_reply_timeout_ms; /* broker.reply_timeout_ms: the longest any broker operation waits on a silent
                                  * server (a confirm, an RPC reply, a Redis reply beyond its block time, a
                                  * login); RabbitMQ heartbeats are negotiated at half of it (seconds, rounded
                                  * up). Then the connection is dropped and the process moves on (the next
                                  * node; the primary the Sentinels name). docs/scaling.md, "What a hang costs" */
    int password_opslimit;    /* argon2id cost (crypto_pwhash_str) */
    int password_memlimit_mb;
    /* where each URL came from, for messages: "database.url", "CONVEYOR_DATABASE_URL" or
     * "CONVEYOR_DATABASE_URL_FILE" (and the same for rabbitmq and redis); static strings */
    const char *database_url_setting, *rabbitmq_url_setting, *redis_url_setting;
    /* http.listen: the address of the pool's HTTP listener (/livez, /readyz,
     * /metrics), "127.0.0.1:9464" or "[::1]:9464" (an IP address, not a name);
     * NULL: no listener. Checked by cfg_load (cfg_http_address). */
    char *http_listen;
    /* http.token, or the content of http.token_file: what the dashboard's actions
     * (retry, purge, pause) need; NULL: actions are off. At least HTTP_TOKEN_MIN
     * characters. Never printed. */
    char *http_token;
    struct cfg_queue *queues;
    int nqueues;
    struct cfg_schedule *schedules; /* `schedules` (owned); none: NULL, 0 */
    int nschedules;
    struct cfg_rate_limit *rate_limits; /* `rate_limits` (owned); none: NULL, 0 */
    int nrate_limits;
    struct cfg_producer *producers; /* `producers` (owned); none: NULL, 0 */
    int nproducers;
};

/* cfg_schedules.c: one entry of `schedules` (a libconfig group g whose members
 * cfg.c has checked are known) read into *s: name, cron (parsed) or every,
 * timezone (tz_known), type (not its routing: cfg.c checks it), payload (a JSON
 * object), catch_up, catch_up_window, with their defaults. Returns 0, or
 * CV_ECONFIG with why (naming the field, not the file) and *where, the setting
 * at fault (for its line). Either way *s may own memory: cfg_schedule_free. */
struct config_setting_t;
int cfg_schedule_read(const struct config_setting_t *g, struct cfg_schedule *s, char *why, size_t n,
                      const struct config_setting_t **where);
/* Frees what cfg_schedule_read allocated in s (not s); NULL is fine. */
void cfg_schedule_free(struct cfg_schedule *s);
/* cfg_rate_limits.c: one entry of `rate_limits` (group g, members known) read
 * into *rl: name, types (not their routing: cfg.c checks it) or queue (its
 * name only: cfg.c adds its commands with cfg_rate_limit_add_type), rate,
 * burst, key, over, shards, with their defaults. Returns 0, or CV_ECONFIG with
 * why and *where as cfg_schedule_read. Either way *rl may own memory:
 * cfg_rate_limit_free. */
int cfg_rate_limit_read(const struct config_setting_t *g, struct cfg_rate_limit *rl, char *why, size_t n,
                        const struct config_setting_t **where);
/* Appends a copy of type to rl's types. */
void cfg_rate_limit_add_type(struct cfg_rate_limit *rl, const char *type);
/* Frees what cfg_rate_limit_read allocated in rl (not rl); NULL is fine. */
void cfg_rate_limit_free(struct cfg_rate_limit *rl);
/* The rate limit that counts command type TYPE, or NULL (a type is in one at most). Points into c. */
const struct cfg_rate_limit *cfg_rate_limit_for(const struct cfg *c, const char *type);

/* Reads and checks FILE, then applies the CONVEYOR_* environment overrides.
 * Returns 0, or CV_ECONFIG with a message naming the file, line and key in err.
 * *out is overwritten (not freed first); on success the caller cfg_free()s it,
 * on error it is freed and zeroed already.
 * The environment may give a URL in a
 * file: CONVEYOR_DATABASE_URL_FILE, CONVEYOR_RABBITMQ_URL_FILE, CONVEYOR_REDIS_URL_FILE
 * (its content, trailing newlines stripped; the variable and its _FILE both set, or an
 * unreadable file, is an error naming the variable and the path). The URLs the
 * configuration uses (the database's always, a broker's when some queue or the events
 * use it) are checked (url_check: syntax only, no connection); err names the setting,
 * shows the URL redacted and never holds a password. */
int cfg_load(const char *path, struct cfg *out, char *err, size_t errlen);
/* Frees what cfg_load allocated; safe on a zeroed struct. */
void cfg_free(struct cfg *c);
/* The queue that routes TYPE, or NULL. Points into c. */
const struct cfg_queue *cfg_queue_for(const struct cfg *c, const char *type);
/* Records FIELD (a static string, not copied; NULL: none) as the payload field
 * that names the aggregate of command TYPE, in the queue TYPE is routed to
 * (q->order_fields); a type routed nowhere is ignored. */
void cfg_set_order_field(struct cfg *c, const char *type, const char *field);
/* The queue called NAME, or NULL. */
const struct cfg_queue *cfg_queue_named(const struct cfg *c, const char *name);
/* True when some queue, or the events, use transport T. */
bool cfg_uses(const struct cfg *c, enum transport t);
#define HTTP_TOKEN_MIN 16
/* Splits an http.listen value, "IPv4:PORT" or "[IPv6]:PORT", into host (the
 * address without brackets, at most n-1 bytes) and *port (1-65535); *v6 says
 * which family. Returns true, or false when it is not of that form. */
bool cfg_http_address(const char *listen, char *host, size_t n, int *port, bool *v6);

/* ---- url.c: connection URLs ------------------------------------------------------ */
/* url with its password replaced by ***: scheme://user:***@host..., libpq's
 * password=... key in a key=value string, a password= query parameter; a text
 * that is neither a URL nor key=value and holds ':' or '@' is all ***. At most n-1
 * bytes (truncated), always NUL-terminated; NULL url gives "". */
void url_redact(const char *url, char *out, size_t n);
/* text (an error message that may echo url, e.g. libpq's) with every password that url
 * holds, as written and percent-decoded, replaced by ***; into out (n bytes, always
 * NUL-terminated). text is cut at 1023 bytes; NULL text gives "". */
void url_scrub(const char *text, const char *url, char *out, size_t n);
enum url_kind { URL_POSTGRES, URL_AMQP, URL_REDIS };
/* Checks url's syntax for its kind (no connection): PostgreSQL: postgresql:// or
 * postgres:// or a libpq key=value string (PQconninfoParse); RabbitMQ: amqp://
 * (amqp_parse_url), or a list of them separated by commas (url_list_item); Redis:
 * redis:// or redis-sentinel://; and a port of 1-65535. Returns 0, or CV_ECONFIG
 * with the reason in why (which never holds the password). */
int url_check(enum url_kind kind, const char *url, char *why, size_t n);
/* redis://[[user]:password@]host[:port][/db], or
 * redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db]
 * (the Sentinels to ask for the primary of master; the password is the primary's), parsed */
#define SENTINEL_SCHEME "redis-sentinel://"
#define REDIS_SENTINELS_MAX 8
struct redis_sentinel {
    char host[256];
    int port; /* 26379 when absent */
};
struct redis_url {
    char user[128], password[256], host[256]; /* host and port: redis:// only */
    int port, db;
    int nsentinels;                           /* redis-sentinel:// only: 1 or more */
    struct redis_sentinel sentinels[REDIS_SENTINELS_MAX];
    char master[128];
};
/* Parses url into *out (host 127.0.0.1, port 6379 and db 0 when absent). Returns 0, or
 * CV_ECONFIG with the reason in why (*out then holds what was parsed before it). */
int url_parse_redis(const char *url, struct redis_url *out, char *why, size_t n);
/* A RabbitMQ URL setting may list the nodes of one cluster: "amqp://a,amqp://b".
 * url_list_count returns how many URLs list holds (1 or more); url_list_item copies
 * URL i (from 0, spaces around it cut) into out and returns true, or false when
 * there is no URL i or it does not fit in n bytes. */
int url_list_count(const char *list);
bool url_list_item(const char *list, int i, char *out, size_t n);

/* ---- id.c / clock.c / utf8.c ------------------------------------------------ */
#define ID_LEN 36
void id_new(char out[ID_LEN + 1]);                 /* random UUID, lower case */
/* True for a canonical 8-4-4-4-12 hex UUID; writes it lower-cased to out if not NULL. */
bool id_parse(const char *s, char out[ID_LEN + 1]);
int64_t clock_ms(void);                            /* wall clock, ms since epoch */
int64_t clock_mono_ms(void);                       /* monotonic ms */
int64_t clock_mono_us(void);                       /* monotonic microseconds (durations) */
void clock_rfc3339(int64_t ms, char out[32]);      /* 2026-11-20T10:00:00.123Z */
bool clock_rfc3339_valid(const char *s);           /* RFC 3339 date-time, any offset */
/* An RFC 3339 date-time (any offset) as ms since the epoch (fraction cut to ms) into *out: true, or
 * false (*out untouched) when not valid. A valid date-time before 1970 gives a negative *out. */
bool clock_rfc3339_ms(const char *s, int64_t *out);
bool utf8_valid(const char *s, size_t len);        /* well-formed, no overlongs or surrogates */
size_t utf8_chars(const char *s);                  /* code points in a valid string */
/* Makes s valid UTF-8 in place: each byte that starts no well-formed character
 * (a character cut by a truncation, a byte of another encoding) becomes '?'. */
void utf8_cut(char *s);

/* ---- signals.c ------------------------------------------------------------------ */
/* From now on SIGTERM and SIGINT set *flag to 1 (no SA_RESTART needed: loops poll it). */
void signals_stop_sets(volatile sig_atomic_t *flag);

/* ---- json_check.c ----------------------------------------------------------------- */
#define JSON_MAX_DEPTH 512
/* True when text is exactly one JSON value (RFC 8259, strictly), nested at most
 * max_depth deep; otherwise false with a static reason in *why (why may be NULL;
 * *why is NULL on success). Allocates nothing. */
bool json_check(const char *text, size_t len, int max_depth, const char **why);

/* ---- json_out.c: small helpers for the JSON Conveyor writes ---------------------- */
/* Adds key: value to o, or key: null when value is NULL. */
void json_add_optional(cJSON *o, const char *key, const char *value);
/* Adds v to o as key, or null when v is NaN or negative (not known). */
void json_add_number_or_null(cJSON *o, const char *key, double v);

/* ---- backoff.c ------------------------------------------------------------------ */
/* Capped exponential backoff for attempt n (0-based): d = base_ms doubled n times,
 * at most cap_ms; returns a random delay in [d/2, d] (jittered, with a floor). */
int backoff_ms(int attempt, int base_ms, int cap_ms);
/* Sleeps ms (in steps of 100 ms), waking early when *stop becomes true; stop may be NULL. */
void backoff_sleep(int ms, volatile sig_atomic_t *stop);
/* Opens a connection to a server: the connection, or NULL with the class of the
 * failure in *cls (CV_ERETRY on entry) and why in err. */
typedef void *(*backoff_open_fn)(const void *arg, int *cls, char *err, size_t errlen);
/* The one loop that waits for a server: calls open(arg, ...) until it returns a
 * connection, sleeping with capped backoff (100 ms doubling to 5 s, jittered)
 * after each transient failure (CV_ERETRY); logs once when the wait starts
 * ("<what> unreachable, waiting for it: <why>") and once when it is over
 * ("<what> is back"), never once per attempt. Returns the connection (the
 * caller owns it), or NULL: when *stop is set (err ""), or when open failed with
 * another class, a configuration error (err says why; the password of a URL is
 * never in it). */
void *backoff_open(backoff_open_fn open, const void *arg, const char *what, volatile sig_atomic_t *stop, char *err,
                   size_t errlen);

/* ---- trace.c: W3C Trace Context -------------------------------------------------- */
#define TRACE_ID_LEN 32     /* hex digits of a trace-id */
#define TRACE_SPAN_LEN 16   /* hex digits of a parent-id (span id) */
#define TRACEPARENT_LEN 55  /* "00-<trace-id>-<parent-id>-<flags>" */
struct trace {
    char trace_id[TRACE_ID_LEN + 1];   /* "" when there is no trace context */
    char parent_id[TRACE_SPAN_LEN + 1];
    char flags[3];
};
/* Parses a traceparent value (W3C Trace Context, strictly): version 00 is
 * exactly 55 characters; a later version (not ff) is read as version 00 when
 * its first 55 characters are, and what follows starts with '-'; hex is lower
 * case; trace-id and parent-id are not all zero. Returns true with *out
 * filled, or false with *out emptied and a static reason in *why (why may be
 * NULL); s NULL is false ("absent"). */
bool trace_parse(const char *s, struct trace *out, const char **why);
/* The traceparent of a new span in trace t: version 00, t's trace-id, a new
 * random parent-id (not all zero, not t's), t's flags; into out. Returns true,
 * or false with out "" when t has no trace context (t NULL or trace_id ""). */
bool trace_child(const struct trace *t, char out[TRACEPARENT_LEN + 1]);

/* ---- envelope.c: the command envelope ------------------------------------------- */
struct envelope {
    char id[ID_LEN + 1];     /* lower-cased */
    char type[CFG_NAME_MAX];
    const cJSON *payload;    /* points into root */
    const char *correlation_id; /* NULL when absent; points into root */
    const char *created_at;  /* NULL when absent; points into root */
    int64_t created_ms;      /* created_at in ms since the epoch (parsed once, here); -1 when absent or invalid */
    const char *not_before;  /* notBefore: not applied before this time (RFC 3339 with an offset); NULL when
                              * absent or invalid (then in field_errors); points into root */
    struct trace trace;      /* from the traceparent field, else envelope_trace_header; trace_id "" when none */
    const char *trace_ignored; /* why the traceparent field was ignored (static), or NULL */
    enum lane_class priority; /* the priority field; LANE_NORMAL when absent or invalid (then in field_errors) */
    const char *fairness_key; /* fairnessKey, or NULL when absent or invalid; points into root */
    const char *ordering_key; /* orderingKey, or NULL (then the payload's aggregate: lane_order_key) */
    bool has_nul;            /* a string somewhere holds \u0000 */
    cJSON *field_errors;     /* envelope fields that break a rule ({field: reason}), or NULL */
    cJSON *root;             /* owned */
};
/* Parses and checks a command. fallback_id (RabbitMQ message_id) is used when
 * the body has no id. Returns 0, or CV_EDEAD with the reason in err when the
 * message is not a usable envelope (docs/contract.md: invalid_envelope). A bad
 * correlationId or createdAt is not dead: it is listed in field_errors. body is
 * not kept (root is a parsed copy). On success the caller envelope_free()s *out;
 * on error *out is zeroed, nothing to free. */
int envelope_parse(const char *body, size_t len, size_t max_bytes,
                   const char *fallback_id, struct envelope *out,
                   char *err, size_t errlen);
/* Frees root and field_errors and zeroes e; NULL and a zeroed e are fine. */
void envelope_free(struct envelope *e);
/* Completes the trace context of a parsed command (a worker calls it once, after
 * envelope_parse): e takes traceparent (the RabbitMQ header of that name; NULL
 * when none) when its own traceparent field gave no valid one (a valid field
 * wins). Tracing is best effort: an invalid field or header is ignored, never
 * an error, and logged at debug here (with the traceId, if the other gave one). */
void envelope_trace_header(struct envelope *e, const char *traceparent);
/* Replaces the value of every password field of a command's payload
 * (password, currentPassword, newPassword) with "***", for display: the
 * command itself is never changed on its way. Returns how many it replaced. */
int envelope_mask_secrets(cJSON *command);
/* Builds the JSON text of a command; id and created_at are made when NULL;
 * not_before (RFC 3339) is left out when NULL. Takes nothing; returns a
 * malloc'd string the caller frees, NULL on error. */
char *envelope_build(const char *id, const char *type, const cJSON *payload,
                     const char *correlation_id, const char *created_at, const char *not_before);

/* ---- event.c: the event envelope ---------------------------------------------- */
/* A new event for command cmd; takes ownership of data (NULL gives {}); cmd is
 * copied from: when it has a trace context the event carries traceparent, a new
 * span of the same trace (trace_child). Caller owns the result (cJSON_Delete). */
cJSON *event_new(const char *type, const struct envelope *cmd,
                 const char *aggregate_type, const char *aggregate_id, cJSON *data);
struct db;
/* Defers (db_defer: sent with db's next statement) the one INSERT of events
 * (a JSON array of event envelopes, as event_new makes them; borrowed) into
 * the outbox, in array order, inside the caller's open transaction. Returns 0,
 * or CV_ERETRY when the array cannot be printed (out of memory), or db_defer's
 * class. A worker's batch (batch.c) and an operator's cancel (parked_view.c)
 * both write their events through it. */
int event_outbox_defer(struct db *db, const cJSON *events);

/* ---- topic.c --------------------------------------------------------------------- */
/* AMQP topic matching: words split by '.', '*' one word, '#' zero or more. A NULL or
 * empty pattern matches every type. */
bool topic_match(const char *pattern, const char *type);

/* ---- db.c: a PostgreSQL connection as a context ------------------------------------------
 * struct db carries the connection, the statements prepared on it, the
 * statements deferred to its next round trip (and the results kept for their
 * handles), and the last error: db_err (its class), db_errstr (its text: the
 * server's primary message, SQLSTATE, constraint, table and column, never a
 * row's contents, so safe to log and store) and db_sqlstate. Every failed
 * statement is also logged (an error for CV_EREFUSED, a warning for CV_ERETRY).
 * One context per connection and process; nothing in db.c is global. */
struct db;
/* Connects. Returns the context (the caller db_close()s it), or NULL with
 * libpq's message in err. */
struct db *db_connect(const char *url, char *err, size_t errlen);
/* Connects, retrying with capped backoff until it succeeds or *stop is set
 * (then NULL). Logs once when the database is lost and once when it is back. */
struct db *db_connect_retry(const char *url, volatile sig_atomic_t *stop);
/* (db_connect_retry also stops, NULL, at a configuration error (see db_connect_class),
 * which it logs as an error: a caller tells it from a stop by *stop.) */
/* As db_connect, and *cls (if not NULL) gets the class of a failure: CV_ECONFIG when
 * the URL does not parse or the server refused the login (SQLSTATE class 28: wrong
 * password, no such role, no pg_hba.conf entry; 3D000: no such database; or a password
 * is needed and the URL has none), or TLS refused the server's certificate
 * (sslmode=verify-full: not for the host, or not signed by sslrootcert), or the server
 * refused the client certificate of sslcert / sslkey (a TLS alert: unknown CA, bad or
 * expired certificate; err then says so), or libpq cannot use that certificate or key;
 * CV_ERETRY otherwise (unreachable, starting up, too
 * many connections). err never holds the URL's password. */
struct db *db_connect_class(const char *url, int *cls, char *err, size_t errlen);
/* (db_connect_class, through a URL that lists several hosts, also never returns a
 * connection to a host that has forked: see db_fork_guard. Then *cls is CV_ERETRY.) */
/* As db_connect_retry (logs once when it starts waiting, once when the database is
 * back), but a configuration error ends it: NULL with the reason in err. Stopped by
 * *stop: NULL with err "". */
struct db *db_connect_wait(const char *url, volatile sig_atomic_t *stop, char *err, size_t errlen);
/* Closes the connection and frees db and all it holds (deferred statements,
 * kept results); NULL is fine. */
void db_close(struct db *db);
/* The libpq connection, for what the context does not wrap (its socket,
 * notifications, event hooks). Owned by db. */
PGconn *db_conn(const struct db *db);
/* True when db is not NULL and its connection works. */
bool db_ok(const struct db *db);
/* For a connection between requests: false when the server has closed it
 * since (it said so, a restart's "terminating connection", or the socket
 * ended); true when nothing says it is gone (a silent peer is found only by
 * the next statement). Reads and drops what the server sent meanwhile
 * (notifications). Never waits. */
bool db_idle_alive(struct db *db);
/* The last error: its class (0 before any), its text, its SQLSTATE ("" when
 * none). The strings live in db until the next error. */
int db_err(const struct db *db);
const char *db_errstr(const struct db *db);
const char *db_sqlstate(const struct db *db);
/* Runs a parameterised statement (after what is deferred, in one round trip),
 * prepared on db the first time it runs there. On success returns 0 and, if
 * out is not NULL, the result (the caller PQclear()s it). On failure returns
 * the error's class: CV_ERETRY for a lost connection, serialization failure,
 * deadlock, timeout, a server out of resources or read-only; CV_EREFUSED for
 * any other error (a constraint violation, bad data, a bug); the first error
 * among the deferred statements is the statement's. On failure *out is NULL and
 * the error is in db_err / db_errstr / db_sqlstate (and logged). Either way
 * nothing stays deferred. */
int db_exec(struct db *db, const char *sql, int nparams, const char *const *params, PGresult **out);
/* Runs SQL text without parameters (BEGIN, "SET x TO y; ..."); as db_exec.
 * With statements deferred, sql must be a single statement. */
int db_cmd(struct db *db, const char *sql);
/* Defers a statement whose result the caller does not need (BEGIN,
 * SAVEPOINT, an INSERT that only has to succeed): it is sent ahead of the next
 * statement in one pipeline (one round trip), and that call returns the first
 * error among them. Copies sql and params. Returns 0, or the error class of
 * the deferred statements that had to run first when sql is new on db (it is
 * prepared after them: then nothing stays deferred), or of its PREPARE; on an
 * error sql is not deferred. */
int db_defer(struct db *db, const char *sql, int nparams, const char *const *params);
/* As db_defer, for a statement whose result the caller reads later: returns
 * a handle (>= 0) for db_take_result, or an error class. */
int db_defer_result(struct db *db, const char *sql, int nparams, const char *const *params);
/* The result of a deferred statement, running what is deferred first if it
 * has not run yet: *out holds it (the caller PQclear()s it), or NULL when it
 * failed or did not run (an earlier statement failed, or it was discarded).
 * The handle is free again. Returns 0, or the error class of the run it makes
 * now. A statement that ran earlier (another call flushed it) and failed gives
 * 0 with *out NULL: check *out. An unknown handle gives CV_EREFUSED (a bug;
 * set in db_err, not logged). */
int db_take_result(struct db *db, int handle, PGresult **out);
/* Frees every result kept for a handle and not taken, and frees the handles (at
 * the end of a transaction, with nothing deferred). */
void db_release_results(struct db *db);
/* Runs the deferred statements now (one round trip). Returns 0 or the first error class. */
int db_flush(struct db *db);
/* Drops the deferred statements unsent (their results never come). */
void db_discard(struct db *db);
/* The PostgreSQL array literal of n strings ({"a","b"}: each quoted and
 * escaped, so any text is safe), for a parameter such as $1::uuid[]; NULL
 * items are left out. Returns a malloc'd string the caller frees (never
 * NULL: xmalloc). */
char *db_array(const char *const *items, int n);

/* SQL that formats a timestamptz column as RFC 3339 UTC with milliseconds. */
#define SQL_RFC3339(col) "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

/* ---- db_fork.c: a forked primary among the hosts of a multi-host URL ---------------------
 * After a failover the promoted standby writes on a new timeline; an old primary that
 * comes back writable stays on the old one, and libpq, which keeps the first writable
 * host of the URL's list, may choose it. */
/* The number of hosts url lists (host, or hostaddr, items; 1 when it names none;
 * 0 when it does not parse). */
int db_url_hosts(const char *url);
/* After libpq connected *conn through url (several hosts; app: the application_name
 * to give other connections): when *conn's host takes writes, asks every other host
 * of url, each on its own and all at once (target_session_attrs=any, answers within
 * 1 s, a host that does not answer is not counted), for its system identifier,
 * whether it takes writes and its timeline. When another host of the same system
 * takes writes on a later timeline, *conn's host has forked: *conn is closed and
 * replaced by a connection to the host of the latest timeline, with a warning that
 * names both (0). When no host says so but this process has had a writable
 * connection on a later timeline of that system (its memory, kept across
 * connections: the promoted host may be unreachable for a while), *conn is closed,
 * *conn NULL, and CV_ERETRY with the reason in err (never a password); so too when
 * the later host cannot be opened. A forked host later in the list, which libpq did
 * not choose, is logged as a warning. Returns 0 with *conn the connection to use
 * (owned by the caller, as before); a host whose identity cannot be read (an error,
 * not an answer) is used as libpq chose it, with a warning. */
int db_fork_guard(PGconn **conn, const char *url, const char *app, char *err, size_t errlen);

/* ---- migrate.c --------------------------------------------------------------------------- */
struct migration { const char *name; const char *sql; };
extern const struct migration migrations[]; /* sql/ in name order, NULL-terminated */
/* Applies the pending migrations under an advisory lock (a second pool waits,
 * then finds nothing to do), each file in a transaction of its own. Returns the
 * number applied, or the error class of the failed statement (CV_ERETRY,
 * CV_EREFUSED) with a message in err: that migration is rolled back, those
 * before it stay applied, and the lock is released. */
int migrate_run(struct db *db, char *err, size_t errlen);
extern const struct migration producer_migrations[]; /* sql/producer/ in name order, NULL-terminated */
/* As migrate_run, for a producer's own database (conveyor-admin producer
 * install): schema conveyor, its record conveyor.schema_migrations. */
int migrate_producer(struct db *db, char *err, size_t errlen);
extern const struct migration subscriber_migrations[]; /* sql/subscriber/ in name order, NULL-terminated */
/* As migrate_run, for a subscriber's own database (conveyor-admin subscriber
 * install): the inbox in schema conveyor, recorded as subscriber/<file>. */
int migrate_subscriber(struct db *db, char *err, size_t errlen);

/* ---- broker.c: one interface, two backends ---------------------------------------------- */
/* Unless its comment says otherwise, a broker_* function that returns int returns
 * 0 (or a count), or a negative class with the reason in broker_error(b):
 * CV_ERETRY when the connection broke, or its server was silent past
 * broker.reply_timeout_ms (it is dropped, and re-opened by the next call: on
 * RabbitMQ, after a silence, to the next node of the list), CV_EREFUSED when the broker refused the request, CV_ECONFIG when it
 * refused the login while re-opening (Redis publishes and moves say CV_ERETRY
 * then). b keeps cfg, and the queue given to broker_consume, broker_dead_read
 * or broker_dead_take: they must outlive it; other pointer arguments are
 * borrowed for the call. A message whose settling (ack, requeue, dead letter,
 * retry) fails stays in flight. */
struct broker;

struct delivery {
    char *body;            /* owned; NUL-terminated for convenience, may hold NULs */
    size_t len;
    char *message_id;      /* RabbitMQ message_id property or NULL; owned */
    char *traceparent;     /* RabbitMQ header traceparent (a string) or NULL; owned */
    uint64_t tag;          /* RabbitMQ delivery tag */
    bool redelivered;      /* delivered before (returned by a crash, a requeue or a retry): a
                            * handler may have started on it, so its attempts are counted */
    int64_t created_ms;    /* a RabbitMQ lane's delivery: its createdAt (ms since the epoch, the
                            * sorter's header x-conveyor-created-ms); 0 when not known */
    int lane;              /* with created_ms: its lane, cls * q->lanes + i */
};
/* Frees body, message_id and traceparent (not d itself); NULL is fine. */
void delivery_free(struct delivery *d);

struct outgoing_event {   /* one event to publish */
    const char *id;
    const char *type;
    const char *json;
    const char *traceparent; /* the event's traceparent field, or NULL: RabbitMQ sends it as a header too */
    const char *aggregate_id; /* its aggregateId, or NULL: RabbitMQ sends it as the header x-conveyor-aggregate,
                               * which subscriptions' consistent-hash exchanges hash (docs/contract.md section 13) */
};

/* Stall reporting. A backend says when it starts waiting for a reply it is
 * owed (budget_ms: how long the wait may rightly take beyond a reply's
 * round trip, e.g. a blocking take's block time), when a reply came, and when
 * a bound fired on a silent peer (broker.reply_timeout_ms, a missed AMQP
 * heartbeat). broker_stall_hook sets the process's one listener (NULL: none;
 * the workers' scoreboard); it is called on the caller's thread, and must not
 * block. */
enum broker_note { BROKER_WAITING, BROKER_ANSWERED, BROKER_SILENT, BROKER_IDLE };
typedef void (*broker_stall_fn)(enum broker_note note, int budget_ms);
void broker_stall_hook(broker_stall_fn fn);
/* What the backends call: forwards to the hook, if any. */
void broker_note(enum broker_note note, int budget_ms);

/* Opens a connection for transport t. Returns the broker (the caller
 * broker_close()s it; cfg is borrowed and must outlive it), or NULL with a
 * message in err. */
struct broker *broker_open(const struct cfg *cfg, enum transport t, char *err, size_t errlen);
/* As broker_open, and *cls (if not NULL) gets the class of a failure: CV_ECONFIG when
 * the URL is bad or the broker refused the login (RabbitMQ ACCESS_REFUSED, a vhost
 * that does not exist; Redis AUTH refused, NOAUTH, a bad database number), CV_ERETRY
 * when it cannot be reached. err never holds the URL's password. */
struct broker *broker_open_class(const struct cfg *cfg, enum transport t, int *cls, char *err, size_t errlen);
/* As broker_open_class, waiting while the broker cannot be reached (backoff_open):
 * the broker, or NULL when *stop is set (err "") or at a configuration error (err). */
struct broker *broker_open_wait(const struct cfg *cfg, enum transport t, volatile sig_atomic_t *stop, char *err,
                                size_t errlen);
/* RabbitMQ, when cfg uses it: opens a connection, declares the exchanges, every
 * queue, its bindings and dead-letter queue (delay queues are declared by the
 * first broker_retry that needs one), and closes it. Returns 0
 * (also when cfg does not use RabbitMQ), or the class of the failure with why
 * in err (CV_ERETRY: unreachable; CV_ECONFIG; CV_EREFUSED: RabbitMQ refused a
 * declaration, a queue of another type, say). */
int broker_declare_topology(const struct cfg *cfg, char *err, size_t errlen);
/* Sends the acks it holds (broker_ack_batch; a failure is logged), closes and frees
 * b (Redis: stops the heartbeat thread, deletes the heartbeat key); NULL is fine. */
void broker_close(struct broker *b);
const char *broker_error(const struct broker *b); /* last error text; never NULL */
/* RabbitMQ: declares exchanges, every queue, its bindings and dead-letter queue;
 * returns 0 or an error class (CV_EREFUSED: a declaration refused). Redis:
 * nothing to do, returns 0. */
int broker_declare(struct broker *b);
/* Publishes one command to QUEUE (Redis) or to the commands exchange with
 * routing key TYPE (RabbitMQ) and returns once the broker has it (confirm /
 * reply). CV_EREFUSED when the broker refused it (unroutable), CV_ERETRY when
 * the connection failed. */
int broker_publish_command(struct broker *b, const struct cfg_queue *q, const char *type,
                           const char *body, size_t len, const char *message_id);
/* A command to publish: its queue, type, body and id (borrowed). */
struct outgoing_command {
    const struct cfg_queue *q;
    const char *type;
    const char *body;
    size_t len;
    const char *message_id;
    bool *refused;      /* may be NULL; else set to whether this one was refused by a full queue */
};
/* Publishes n commands with one wait for the broker (a window of confirms /
 * one pipeline), as broker_publish_command does one. On an error none of them
 * may be taken as published (some may have been), but CV_EFULL: a queue with
 * max_length was full, the commands with *refused set were not taken (nothing
 * of them is queued) and every other one was confirmed. A queue's fill is
 * checked before sending (RabbitMQ: a passive declare; Redis: in the same
 * script as the LPUSH), and a RabbitMQ nack from a queue found full is a
 * refusal too (the policy's reject-publish), never CV_ERETRY. */
int broker_publish_commands(struct broker *b, const struct outgoing_command *c, int n);
/* Starts consuming QUEUE as worker WORKER_ID (q is kept: it must outlive b).
 * Returns 0: nothing is sent yet. RabbitMQ's basic.consume goes with the first
 * broker_next or broker_take; Redis starts the heartbeat thread, and the first
 * take returns to the queue whatever an earlier process with this worker id
 * left in flight. */
int broker_consume(struct broker *b, const struct cfg_queue *q, const char *worker_id);
/* As broker_consume, for worker number worker_index (0 .. q->workers - 1) of
 * its pool: a laned queue's worker consumes the lanes i with i % q->workers ==
 * worker_index (of every class); broker_consume is worker_index 0 of a queue
 * with one worker's view: every lane. */
int broker_consume_as(struct broker *b, const struct cfg_queue *q, const char *worker_id, int worker_index);
/* Laned queues (q->lanes >= 2). The sorter's step on RabbitMQ, the one active
 * sorter's (workers/lane_sorter.c): moves up to max commands waiting in the
 * queue q (its intake, where producers publish) into their lanes, in the
 * order they arrived: published with confirms to the class's consistent-hash
 * exchange with the lane key as routing key (lane_route), then acked. Waits up
 * to timeout_ms for the first. Returns how many moved, or an error class (then
 * none is acked: RabbitMQ hands them out again, and a copy that reached a lane
 * is applied once by its id). Redis: 0 (its take script sorts). */
int broker_sort_lanes(struct broker *b, const struct cfg_queue *q, int max, int timeout_ms);
/* One lane's figures: waiting commands, and the age of its oldest in seconds
 * (-1: not known; RabbitMQ cannot read a message without taking it:
 * broker_lane_counts leaves it -1 there, and the readers fill it from what the
 * workers hold, broker_lane_oldest via the pools' lane_oldest rows). */
struct lane_count {
    long depth;
    double oldest_age_s;
};
/* Fills out[cls * q->lanes + i] for every lane of the laned queue q (and the
 * queue's intake is in broker_queue_counts' waiting). Returns 0 or a class. */
int broker_lane_counts(struct broker *b, const struct cfg_queue *q, struct lane_count *out);
/* A laned worker's (broker_consume_as of a queue with lanes >= 2): for each
 * lane it consumes, the createdAt (ms since the epoch) of the oldest command
 * it has buffered and not handed out, into out[cls * q->lanes + i] where that
 * is older than what out holds (0: none; the caller zeroes out, LANE_CLASSES *
 * q->lanes entries, and adds what it was handed and holds). RabbitMQ only;
 * any other broker leaves out as it is and returns false (Redis reads its
 * lanes' heads: broker_lane_counts). Returns true when it told. Cannot fail. */
bool broker_lane_oldest(struct broker *b, int64_t *out);
/* Waits up to timeout_ms for a message (Redis: at most half the heartbeat
 * interval). Returns 1 with *d filled (caller delivery_free()s it), 0 on
 * timeout, or an error class (CV_ERETRY when the connection broke); *d is
 * emptied first and holds nothing unless 1. */
int broker_next(struct broker *b, struct delivery *d, int timeout_ms);
/* Takes up to max messages already waiting, without waiting (Redis: in one
 * round trip, and no more than the queue's waiting messages divided by its
 * workers, rounded up, so that a backlog spreads over them). Returns how many
 * it put in d[0..] (each the caller delivery_free()s), or an error class
 * (CV_ERETRY when the connection broke) when none was taken. RabbitMQ takes one
 * at a time: a failure after the first returns those already taken. */
int broker_take(struct broker *b, struct delivery *d, int max);
/* Removes the message for good (after commit), now. RabbitMQ: always 0 (an ack
 * that cannot be sent is logged; the message is redelivered and found done). */
int broker_ack(struct broker *b, const struct delivery *d);
/* Removes a batch of n messages for good, in the order they arrived; every
 * message delivered before them must be settled already. The backend may hold
 * the ack and send it with the next take, in the same round trip (RabbitMQ:
 * one multiple ack for consecutive batches, sent before the consumer waits or
 * once it covers half the prefetch; Redis: in the script that takes the next
 * batch), and sends what it holds on broker_close. Until then a crash hands
 * the messages out again, and the worker finds them done. Returns 0 or an
 * error class (RabbitMQ: always 0, as broker_ack; Redis: CV_ERETRY when out of
 * memory holding them). */
int broker_ack_batch(struct broker *b, const struct delivery *d, int n);
/* Puts the message back on its queue, for a later attempt (Redis: marked
 * returned). RabbitMQ: 0 when the channel is gone (it is back already). */
int broker_requeue(struct broker *b, const struct delivery *d);
/* Hands the message back to its queue as it was taken, without the mark of a
 * requeue: taken again, it is redelivered only if it was (d->redelivered), so
 * the handing back counts as no handler start (the database breaker, workers/
 * breaker.c: a message held when the database failed). RabbitMQ: a confirmed
 * copy (body, message_id, traceparent, and the header x-conveyor-redelivered
 * when it was redelivered) goes to the tail of the queue, then the original
 * is acked; Redis: back to the producer end of the queue, marked returned
 * only if it was. Returns 0 or an error class (the message then stays in
 * flight: RabbitMQ returns it marked redelivered when the connection closes). */
int broker_release(struct broker *b, const struct delivery *d);
/* Stops this consumer's deliveries and hands over, into d (up to max; the
 * caller delivery_free()s each), those the broker had already delivered to it
 * and the worker had not taken: RabbitMQ basic.cancel, then what arrived
 * before its cancel-ok; Redis delivers nothing ahead of a take: 0. The caller
 * settles them (broker_release) and closes b. Returns how many, or an error
 * class (the connection is then dropped: RabbitMQ returns them, redelivered). */
int broker_stop_consuming(struct broker *b, struct delivery *d, int max);
/* Moves the message, untouched, to the queue's dead letters with why (reason,
 * error and attempts are copied into it). dead_id (may be NULL) names this
 * dead-lettering for the dead-letter index (RabbitMQ: the header
 * x-conveyor-dead-id; Redis ignores it: its list is read in pages as it is). */
int broker_dead_letter(struct broker *b, const struct delivery *d, const char *reason,
                       const char *error, int attempts, const char *dead_id);
/* Moves the message, untouched, out of the way for delay_ms, after which it is
 * back on its queue (RabbitMQ: a delay queue whose TTL dead-letters back;
 * Redis: the retry sorted set, moved back by broker_maintain). */
int broker_retry(struct broker *b, const struct delivery *d, int delay_ms);
/* Redis liveness (liveness.c; the heartbeat is redis_heartbeat.c): a consuming worker's heartbeat is refreshed by
 * a thread of its own while the worker makes progress, that is, gets a reply from
 * its broker or a result from the database connection given here (every result,
 * an error too, counts). Call once per connection, right after it is opened.
 * NULL is ignored; a connection that cannot be watched is logged (a warning). */
void liveness_watch_db(PGconn *db);
/* Notes that this process made progress now (the Redis backend, at a broker
 * call). Cannot fail; safe from any thread. */
void liveness_progress(void);
/* Monotonic ms of this process's last progress (liveness_progress, or a result
 * on a watched connection); 0 if none yet. Safe from any thread. */
int64_t liveness_progress_at_ms(void);
/* Redis housekeeping, run by the reaper: moves due retries back to their queues
 * and returns the in-flight messages of workers whose heartbeat expired.
 * Returns the number of messages moved, or an error class (what moved before it
 * stays moved). RabbitMQ: nothing to do, returns 0. */
int broker_maintain(struct broker *b);

/* A dead letter as the admin command sees it; every string owned. */
struct dead_letter {
    char *body;            /* the original message, untouched */
    size_t len;
    char *message_id;      /* RabbitMQ property, or NULL */
    char *reason, *error, *failed_at;
    char *dead_id;         /* RabbitMQ header x-conveyor-dead-id (its row in the index), or NULL */
    int attempts;
};
/* Frees the n dead letters and the array d; NULL is fine. */
void dead_letters_free(struct dead_letter *d, int n);
/* Chooses dead letters: true for d, which is borrowed for the call; index
 * counts from 1 in list order (oldest first). */
typedef bool (*dead_select_fn)(const struct dead_letter *d, int index, void *arg);
/* Reads the dead letters of q without removing them: *out (caller frees with
 * dead_letters_free(*out, *n), after an error too: it holds those read before)
 * and *n. Returns 0 or an error class. */
int broker_dead_read(struct broker *b, const struct cfg_queue *q, struct dead_letter **out, int *n);
/* Removes the dead letters of q that sel chooses; with requeue, each is first
 * published again, untouched, to q. *count is how many. Returns 0, or an error
 * class: the walk stops there, and *count says how many went before it. */
int broker_dead_take(struct broker *b, const struct cfg_queue *q, dead_select_fn sel, void *arg,
                     bool requeue, int *count);
/* Reads up to limit dead letters of q without removing them or marking them
 * redelivered, skipping the offset oldest (oldest first): *out (caller frees
 * with dead_letters_free(*out, *n), after an error too) and *n. Redis: LRANGE
 * from the list's old end. RabbitMQ cannot read a queue without taking from
 * it: CV_EREFUSED (its pages come from the index in PostgreSQL, dead_index.c). */
int broker_dead_page(struct broker *b, const struct cfg_queue *q, long offset, int limit, struct dead_letter **out,
                     int *n);
/* The number of dead letters of q into *n (RabbitMQ: a passive declare; Redis:
 * LLEN): one round trip whatever their number. Returns 0 or an error class. */
int broker_dead_count(struct broker *b, const struct cfg_queue *q, long *n);
/* What a queue holds, as its broker tells it (conveyor-admin stats; the metrics). */
struct queue_counts {
    long waiting;   /* ready to be taken */
    long in_flight; /* taken by a worker and not settled yet (Redis: the in-flight lists); -1 on RabbitMQ,
                     * which tells its unacked messages only through its management plugin */
    long retrying;  /* waiting out a retry delay (RabbitMQ: the delay queues of the current retry
                     * settings; Redis: the retry set) */
    long dead;      /* dead letters */
    long consumers; /* RabbitMQ: consumers of the queue (0 while every pool has it paused); -1 on Redis */
};
/* Counts what q holds into *out. Returns 0, or an error class (*out is then
 * partly filled). RabbitMQ reads them with passive declares: a queue not
 * declared yet counts 0. */
int broker_queue_counts(struct broker *b, const struct cfg_queue *q, struct queue_counts *out);

/* Publishes events in order and returns once the broker has all of them: 0, or
 * an error class (some may have been published). RabbitMQ: an event no queue is
 * bound for is not an error. */
int broker_publish_events(struct broker *b, const struct outgoing_event *ev, int n);
/* Starts receiving events whose type matches PATTERN (topic syntax; NULL or ""
 * for all), from now on; again after an error, to resume (events meanwhile are
 * missed). Returns 0 or an error class. */
int broker_subscribe(struct broker *b, const char *pattern);
/* Waits up to timeout_ms for the next event: 1 with *json (malloc'd, caller
 * frees), 0 on timeout, or an error class (*json untouched): RabbitMQ's
 * subscription is then lost (broker_subscribe again). */
int broker_next_event(struct broker *b, char **json, int timeout_ms);

/* Durable subscriptions (docs/contract.md section 13): the broker's side. The
 * registry, the partitions' ownership, retries and replay are the library's
 * (producer/subscription.c); a backend keeps the queues (RabbitMQ) or groups
 * (Redis) of each partition and reads and acknowledges them. */
#define SUBSCRIPTION_PARTITIONS_MAX 64
struct subscription_spec {
    const char *name;              /* checked: 1-64 of [A-Za-z0-9_-] */
    const char *const *patterns;   /* topic patterns, npatterns of them */
    int npatterns;
    int partitions;                /* 1..SUBSCRIPTION_PARTITIONS_MAX */
};
/* One event of a partition, as fetched. json is malloc'd (sub_delivery_free). */
struct sub_delivery {
    char *json;
    size_t len;
    int partition;
    uint64_t tag;      /* RabbitMQ: the delivery tag */
    uint64_t gen;      /* RabbitMQ: the consume connection it came on (a tag of an older one is dead) */
    char entry[48];    /* Redis: the stream entry id */
    bool redelivered;  /* it was delivered before (RabbitMQ's flag; Redis: read from the pending list) */
};
struct subscription_counts {
    long lag;              /* section 13's lag: RabbitMQ ready messages, Redis the slowest group's lag + pending */
    double oldest_age_s;   /* Redis: the oldest unsettled entry's age (0: none); RabbitMQ: -1 (unknown) */
    long consumers;        /* RabbitMQ: consumers of its queues; Redis: -1 */
    bool gap;              /* Redis: the stream was trimmed past entries a partition had not read */
};
void sub_delivery_free(struct sub_delivery *d);
/* Creates what s needs on the broker unless it is there (idempotent): RabbitMQ
 * the hash exchange bound to the events exchange with each pattern and the
 * partition queues; Redis the partition groups, at the stream's last entry.
 * Returns 0 or an error class. */
int broker_subscription_declare(struct broker *b, const struct subscription_spec *s);
/* Starts reading partition i of s (RabbitMQ: a consumer with prefetch on its
 * queue; Redis: from its pending entries first). s is borrowed until detach or
 * close. Returns 0 or an error class. */
int broker_subscription_attach(struct broker *b, const struct subscription_spec *s, int partition, int prefetch);
/* Stops reading partition i (every partition: -1): what was fetched of it and
 * not acked comes again to its next reader. RabbitMQ opens the consume
 * connection anew, so every partition's unacked deliveries come again (an ack
 * of the older connection's, by its gen, is not sent). Returns 0 or an error class. */
int broker_subscription_detach(struct broker *b, int partition);
/* Waits up to timeout_ms for events of the attached partitions: returns how
 * many it wrote to out (at most max; 0 on timeout), or an error class (every
 * partition is then detached: attach again). room (may be NULL) bounds what is
 * read of each partition (room[i] <= 0: none; RabbitMQ's prefetch bounds it
 * there). Events of a partition come in its order; Redis skips (and acks)
 * entries of other partitions and types. */
int broker_subscription_fetch(struct broker *b, struct sub_delivery *out, int max, const int *room, int timeout_ms);
/* Keeps the reading connection alive while no fetch runs (a handler running
 * long): RabbitMQ sends a heartbeat on the consume connection; Redis nothing.
 * Returns 0 or an error class. */
int broker_subscription_keepalive(struct broker *b);
/* Acknowledges d (it was handled). Returns 0 or an error class (it may come again). */
int broker_subscription_ack(struct broker *b, const struct sub_delivery *d);
/* Counts s on the broker into *out. Returns 0 or an error class. */
int broker_subscription_counts(struct broker *b, const struct subscription_spec *s, struct subscription_counts *out);
/* Deletes what s has on the broker (its events with it). Returns 0 or an error class. */
int broker_subscription_remove(struct broker *b, const struct subscription_spec *s);
/* The partition of an event of aggregate id on Redis: crc32(id) mod partitions. */
int subscription_partition_of(const char *aggregate_id, int partitions);

/* Names of things, from the prefix (buffers of at least 256 bytes). */
/* A durable subscription's names (docs/contract.md section 13): RabbitMQ its
 * hash exchange <prefix>.sub.<name> and partition queue <prefix>.sub.<name>.<i>;
 * Redis its partition group sub:<name>:<i> and that group's one consumer <name>:<i>. */
void names_amqp_subscription(const struct cfg *c, const char *name, char *out, size_t n);
void names_amqp_subscription_partition(const struct cfg *c, const char *name, int i, char *out, size_t n);
void names_redis_subscription_group(const char *name, int i, char *out, size_t n);
void names_redis_subscription_consumer(const char *name, int i, char *out, size_t n);
void names_amqp_queue(const struct cfg *c, const char *queue, char *out, size_t n);
void names_amqp_dead(const struct cfg *c, const char *queue, char *out, size_t n);
void names_redis(const struct cfg *c, const char *kind, const char *queue, char *out, size_t n);
/* Lanes (docs/contract.md, "Lanes"): the lane queue <prefix>.<queue>.lane.<class>.<i>
 * (quorum; single active consumer when the queue is ordered), the
 * consistent-hash exchange of a class <prefix>.<queue>.lanes.<class> that the
 * sorter publishes to; Redis, the list <prefix>:queue:<queue>:lane:<class>:<i>. */
void names_amqp_lane(const struct cfg *c, const char *queue, int cls, int lane, char *out, size_t n);
void names_amqp_lanes_exchange(const struct cfg *c, const char *queue, int cls, char *out, size_t n);
void names_redis_lane(const struct cfg *c, const char *queue, int cls, int lane, char *out, size_t n);

/* ---- schedule.c: a schedule's slots (pure; the timekeeper fires them) -------------- */
#define SLOT_KEY_MAX 32
/* The namespace of slot ids (UUIDv5), fixed for ever: docs/contract.md. */
#define SCHEDULE_ID_NAMESPACE "6d1f3c2e-5b7a-4c1e-9f0d-2a8b4e6c7d95"
/* The key of slot `slot` of s into out: a cron slot is its wall time
 * (naive seconds) as "YYYY-MM-DDTHH:MM:SS"; an `every` slot its instant
 * (unix seconds) as "@<seconds>". */
void schedule_slot_key(const struct cfg_schedule *s, int64_t slot, char out[SLOT_KEY_MAX]);
/* The command id of a slot: the UUIDv5 (SHA-1, RFC 9562) of "<name>\n<key>"
 * in SCHEDULE_ID_NAMESPACE, lower case. The same everywhere, for ever. */
void schedule_slot_id(const char *name, const char *key, char out[ID_LEN + 1]);
/* A copy of s->payload (parsed) in which every string equal to or holding
 * "{{slot}}" has it replaced by slot_text; the caller cJSON_Delete()s it. */
cJSON *schedule_payload(const struct cfg_schedule *s, const char *slot_text);
/* every: the first slot (unix seconds, a multiple of every_s) strictly after `after`. */
int64_t schedule_every_next(int64_t every_s, int64_t after);
/* True when zone names a zone of the system's tz data: a TZif file under
 * /usr/share/zoneinfo (no "..", no leading '/'). "UTC" is one. */
bool tz_known(const char *zone);

/* ---- duration.c -------------------------------------------------------------------- */
/* A duration as queues.conf writes it: an integer and a unit s, m, h or d ("90s",
 * "15m", "1h", "2d"; a bare integer is seconds), into *seconds: true, or false
 * (*seconds untouched) for anything else (a sign, a space, a fraction, too long). */
bool duration_parse(const char *s, int64_t *seconds);

/* ---- schedule_zone.c: a schedule's slots in the database's clock and tz data ---------- *
 * Each returns 0, or db_exec's error class (the error in db_err / db_errstr);
 * the out values are written only on 0. The zone is read from PostgreSQL's tz
 * data, never from the session's TimeZone or the process's TZ. */
/* The instant (unix ms) of slot `slot` of s: every: slot * 1000 (no query);
 * cron: conveyor_wall_instant (migration 0010) of the slot's wall time in
 * s->timezone (a wall time that does not exist: the instant of the change; one
 * that happens twice: the later). */
int schedule_slot_instant(struct db *db, const struct cfg_schedule *s, int64_t slot, int64_t *instant_ms);
/* The database's now() as unix ms into *now_ms, and into *now_slot_base the
 * value to pass as `after` to cron_next (cron: the wall time of now() in
 * s->timezone, naive seconds) or schedule_every_next (every: now in unix
 * seconds), both rounded down to the second: the next slot after now. */
int schedule_wall_now(struct db *db, const struct cfg_schedule *s, int64_t *now_slot_base, int64_t *now_ms);
/* The instant instant_ms as RFC 3339 to the second, with the UTC offset of
 * s->timezone at that instant ("2026-03-29T03:00:00+02:00"); "Z" for an
 * `every` schedule and for the zone "UTC". Into out (always NUL-terminated on 0). */
int schedule_slot_text(struct db *db, const struct cfg_schedule *s, int64_t instant_ms, char out[40]);

#endif
