/*
 * core.h - the one internal header of Conveyor's shared library.
 *
 * Conventions (see DESIGN.md): functions return 0 or a negative CV_E* code;
 * pointer returns are NULL on failure; x_free(NULL) is a no-op; every
 * prototype says who owns what it returns. Errors carry a class (retry,
 * reject, dead, fatal) so callers decide ack / retry / dead-letter from the
 * code, never from message text.
 */
#ifndef CONVEYOR_CORE_H
#define CONVEYOR_CORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <cjson/cJSON.h>
#include <libpq-fe.h>

/* ---- error classes ------------------------------------------------------ */
enum {
    CV_OK = 0,
    CV_ERETRY = -1,   /* transient: connection lost, serialization, deadlock, timeout */
    CV_EREJECT = -2,  /* the command breaks a rule: command.rejected, ack */
    CV_EDEAD = -3,    /* the message cannot be processed: dead-letter */
    CV_EFATAL = -4,   /* configuration or programming error: stop */
    CV_ETIMEOUT = -5, /* nothing arrived in time */
    CV_ECONFIG = -6,  /* a setting is wrong (unparsable URL, unknown scheme, credentials the server refuses):
                       * the process stops, exit 2; never retried */
};
const char *cv_strerror(int code); /* static string, never NULL */
/* The exit status of a process stopped by CV_ECONFIG (conveyor-workers at start, or one of its children). */
#define CV_EXIT_CONFIG 2

/* ---- log.c: one JSON object per line on stderr ----------------------------- */
enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR };
/* Names the process in every line ("supervisor", "worker", ...). Reads the
 * level from CONVEYOR_LOG_LEVEL (debug|info|warn|error; default info). */
void log_init(const char *component);
/* The name given to log_init ("conveyor" before). */
const char *log_component(void);
/* command_id may be NULL. Never pass a password, a hash or a payload. */
void log_msg(enum log_level level, const char *command_id, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
#define log_info(...) log_msg(LOG_INFO, NULL, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, NULL, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, NULL, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_DEBUG, NULL, __VA_ARGS__)

/* ---- cfg.c: queues.conf ---------------------------------------------------- */
enum transport { TRANSPORT_RABBITMQ, TRANSPORT_REDIS };
const char *transport_name(enum transport t);
/* "rabbitmq" or "redis" into *t; returns 0, or -1 for anything else. */
int transport_parse(const char *s, enum transport *t);

#define CFG_NAME_MAX 64
struct cfg_queue {
    char name[CFG_NAME_MAX];
    enum transport transport;
    int workers;         /* processes for this queue */
    int prefetch;        /* RabbitMQ basic.qos */
    int max_attempts;    /* handler starts before a message is dead-lettered (retries_exhausted) */
    int batch_size;      /* messages already delivered that a worker runs in one transaction */
    bool quorum;         /* RabbitMQ queue type: quorum (default) or classic */
    char **commands;     /* command types routed here, owned by the cfg */
    int ncommands;
};

struct cfg {
    char *path;               /* the file it was read from */
    char *prefix;             /* "conveyor": exchange, queue and key names */
    char *database_url;
    char *rabbitmq_url;
    char *redis_url;
    enum transport events_transport;
    long events_maxlen;       /* Redis stream MAXLEN ~ */
    long max_message_bytes;   /* a larger command is dead-lettered */
    int stock_low_threshold;  /* stock.low fires at or below this */
    int relay_poll_ms;        /* safety-net poll when no NOTIFY arrives */
    int relay_batch;          /* outbox rows claimed at once */
    long outbox_retention_s;  /* published rows older than this are pruned */
    int shutdown_timeout_s;   /* SIGTERM: time given to in-flight work */
    int max_jobs;             /* a worker is recycled after this many commands (0: never) */
    int max_rss_mb;           /* ... or above this resident size (0: never) */
    int retry_base_ms;        /* backoff of the first retry; doubles per attempt */
    int retry_max_ms;         /* cap of the backoff */
    int heartbeat_interval_s; /* Redis worker heartbeat refresh */
    int heartbeat_ttl_s;      /* Redis heartbeat expiry: then the reaper requeues in-flight work */
    int password_opslimit;    /* argon2id cost (crypto_pwhash_str) */
    int password_memlimit_mb;
    /* where each URL came from, for messages: "database.url", "CONVEYOR_DATABASE_URL" or
     * "CONVEYOR_DATABASE_URL_FILE" (and the same for rabbitmq and redis); static strings */
    const char *database_url_setting, *rabbitmq_url_setting, *redis_url_setting;
    struct cfg_queue *queues;
    int nqueues;
};

/* Reads and checks FILE, then applies the CONVEYOR_* environment overrides.
 * Returns 0, or CV_ECONFIG with a message naming the file, line and key in err.
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
/* The queue called NAME, or NULL. */
const struct cfg_queue *cfg_queue_named(const struct cfg *c, const char *name);
/* True when some queue, or the events, use transport T. */
bool cfg_uses(const struct cfg *c, enum transport t);

/* ---- url.c: connection URLs ------------------------------------------------------ */
/* url with its password replaced by ***: scheme://user:***@host..., libpq's
 * password=... key in a key=value string, a password= query parameter. At most n-1
 * bytes (truncated), always NUL-terminated; NULL url gives "". */
void url_redact(const char *url, char *out, size_t n);
/* text (an error message that may echo url, e.g. libpq's) with every password that url
 * holds, as written and percent-decoded, replaced by ***; into out (n bytes). */
void url_scrub(const char *text, const char *url, char *out, size_t n);
enum url_kind { URL_POSTGRES, URL_AMQP, URL_REDIS };
/* Checks url's syntax for its kind (no connection): PostgreSQL: postgresql:// or
 * postgres:// or a libpq key=value string (PQconninfoParse); RabbitMQ: amqp://
 * (amqp_parse_url); Redis: redis://; and a port of 1-65535. Returns 0, or CV_ECONFIG
 * with the reason in why (which never holds the password). */
int url_check(enum url_kind kind, const char *url, char *why, size_t n);
/* redis://[[user]:password@]host[:port][/db], parsed */
struct redis_url {
    char user[128], password[256], host[256];
    int port, db;
};
/* Parses url into *out (host 127.0.0.1, port 6379 and db 0 when absent). Returns 0, or
 * CV_ECONFIG with the reason in why. */
int url_parse_redis(const char *url, struct redis_url *out, char *why, size_t n);

/* ---- id.c / clock.c / utf8.c ------------------------------------------------ */
#define ID_LEN 36
void id_new(char out[ID_LEN + 1]);                 /* random UUID, lower case */
/* True for a canonical 8-4-4-4-12 hex UUID; writes it lower-cased to out if not NULL. */
bool id_parse(const char *s, char out[ID_LEN + 1]);
int64_t clock_ms(void);                            /* wall clock, ms since epoch */
int64_t clock_mono_ms(void);                       /* monotonic ms */
void clock_rfc3339(int64_t ms, char out[32]);      /* 2026-11-20T10:00:00.123Z */
bool clock_rfc3339_valid(const char *s);           /* RFC 3339 date-time, any offset */
bool utf8_valid(const char *s, size_t len);        /* well-formed, no overlongs or surrogates */
size_t utf8_chars(const char *s);                  /* code points in a valid string */

/* ---- signals.c ------------------------------------------------------------------ */
/* From now on SIGTERM and SIGINT set *flag to 1 (no SA_RESTART needed: loops poll it). */
void signals_stop_sets(volatile int *flag);

/* ---- json_check.c ----------------------------------------------------------------- */
#define JSON_MAX_DEPTH 512
/* True when text is exactly one JSON value (RFC 8259, strictly), nested at most
 * max_depth deep; otherwise false with a static reason in *why. */
bool json_check(const char *text, size_t len, int max_depth, const char **why);

/* ---- backoff.c ------------------------------------------------------------------ */
/* Capped exponential backoff with full jitter: delay for attempt n (0-based). */
int backoff_ms(int attempt, int base_ms, int cap_ms);
/* Sleeps ms, waking early when *stop becomes true. */
void backoff_sleep(int ms, volatile int *stop);

/* ---- envelope.c: the command envelope ------------------------------------------- */
struct envelope {
    char id[ID_LEN + 1];     /* lower-cased */
    char type[CFG_NAME_MAX];
    const cJSON *payload;    /* points into root */
    const char *correlation_id; /* NULL when absent; points into root */
    const char *created_at;  /* NULL when absent; points into root */
    bool has_nul;            /* a string somewhere holds \u0000 */
    cJSON *field_errors;     /* envelope fields that break a rule ({field: reason}), or NULL */
    cJSON *root;             /* owned */
};
/* Parses and checks a command. fallback_id (RabbitMQ message_id) is used when
 * the body has no id. Returns 0, or CV_EDEAD with the reason in err when the
 * message is not a usable envelope (DESIGN.md: invalid_envelope). A bad
 * correlationId or createdAt is not dead: it is listed in field_errors. */
int envelope_parse(const char *body, size_t len, size_t max_bytes,
                   const char *fallback_id, struct envelope *out,
                   char *err, size_t errlen);
void envelope_free(struct envelope *e);
/* Builds the JSON text of a command; id and created_at are made when NULL.
 * Takes nothing; returns a malloc'd string the caller frees, NULL on error. */
char *envelope_build(const char *id, const char *type, const cJSON *payload,
                     const char *correlation_id, const char *created_at);

/* ---- event.c: the event envelope ---------------------------------------------- */
/* A new event for command cmd; takes ownership of data. Caller owns the result. */
cJSON *event_new(const char *type, const struct envelope *cmd,
                 const char *aggregate_type, const char *aggregate_id, cJSON *data);

/* ---- topic.c --------------------------------------------------------------------- */
/* AMQP topic matching: words split by '.', '*' one word, '#' zero or more. */
bool topic_match(const char *pattern, const char *type);

/* ---- db.c: PostgreSQL --------------------------------------------------------------- */
/* Connects, or returns NULL with libpq's message in err. */
PGconn *db_connect(const char *url, char *err, size_t errlen);
/* Connects, retrying with capped backoff until it succeeds or *stop is set
 * (then NULL). Logs once when the database is lost and once when it is back. */
PGconn *db_connect_retry(const char *url, volatile int *stop);
/* (db_connect_retry also stops, NULL, at a configuration error (see db_connect_class),
 * which it logs as an error: a caller tells it from a stop by *stop.) */
/* As db_connect, and *cls (if not NULL) gets the class of a failure: CV_ECONFIG when
 * the URL does not parse or the server refused the login (SQLSTATE class 28: wrong
 * password, no such role, no pg_hba.conf entry; 3D000: no such database; or a password
 * is needed and the URL has none); CV_ERETRY otherwise (unreachable, starting up, too
 * many connections). err never holds the URL's password. */
PGconn *db_connect_class(const char *url, int *cls, char *err, size_t errlen);
/* As db_connect_retry (logs once when it starts waiting, once when the database is
 * back), but a configuration error ends it: NULL with the reason in err. Stopped by
 * *stop: NULL with err "". */
PGconn *db_connect_wait(const char *url, volatile int *stop, char *err, size_t errlen);
/* Closes db (PQfinish) and forgets its prepared statements; NULL is fine. */
void db_close(PGconn *db);
/* Runs a parameterised statement, prepared on db the first time it runs
 * there (so each connection parses and plans it once). On success returns 0 and, if out is not
 * NULL, the result (caller PQclear()s it). On failure returns the class of
 * the error (CV_ERETRY for lost connections, serialization failures,
 * deadlocks and timeouts; CV_EFATAL otherwise), with the SQLSTATE in
 * sqlstate[6] if not NULL. */
int db_exec(PGconn *db, const char *sql, int nparams, const char *const *params,
            PGresult **out, char sqlstate[6]);
/* The error text of the last statement that failed in this process (static). */
const char *db_last_error(void);
/* Runs SQL text without parameters (BEGIN, "SET x TO y; ...", ...); as db_exec.
 * With statements deferred, sql must be a single statement. */
int db_cmd(PGconn *db, const char *sql);
/* Defers a statement whose result the caller does not need at once (BEGIN,
 * SAVEPOINT, an INSERT that only has to succeed): it is sent ahead of the next
 * db_exec or db_cmd on db, in one pipeline (one round trip), and that call
 * returns the first error among them. Copies sql and params. Returns 0, or an
 * error class when too many wait, or when its PREPARE fails (a new statement is
 * prepared after the ones already deferred have run: then their error, and
 * nothing stays deferred). One connection of a process defers at a time. */
int db_defer(PGconn *db, const char *sql, int nparams, const char *const *params);
/* As db_defer, for a statement whose result the caller reads later: when the
 * pipeline has run and the statement succeeded, *out holds its result (the
 * caller PQclear()s it); until then, or if it failed, *out is NULL. */
int db_defer_result(PGconn *db, const char *sql, int nparams, const char *const *params, PGresult **out);
/* Runs db's deferred statements now (one round trip). Returns 0 or the first error class. */
int db_flush(PGconn *db);
/* Drops db's deferred statements unsent. */
void db_discard(PGconn *db);

/* ---- migrate.c --------------------------------------------------------------------------- */
struct migration { const char *name; const char *sql; };
extern const struct migration migrations[]; /* sql/ in name order, NULL-terminated */
/* Applies the pending migrations under an advisory lock (a second pool waits,
 * then finds nothing to do). Returns the number applied, or a negative code
 * with a message in err. */
int migrate_run(PGconn *db, char *err, size_t errlen);

/* ---- broker.c: one interface, two backends ---------------------------------------------- */
struct broker;

struct delivery {
    char *body;            /* owned; NUL-terminated for convenience, may hold NULs */
    size_t len;
    char *message_id;      /* RabbitMQ message_id property or NULL; owned */
    uint64_t tag;          /* RabbitMQ delivery tag */
    bool redelivered;      /* delivered before (returned by a crash, a requeue or a retry): a
                            * handler may have started on it, so its attempts are counted */
};
void delivery_free(struct delivery *d);

struct outgoing_event {   /* one event to publish */
    const char *id;
    const char *type;
    const char *json;
};

/* Opens a connection for transport t. Returns NULL with a message in err. */
struct broker *broker_open(const struct cfg *cfg, enum transport t, char *err, size_t errlen);
/* As broker_open, and *cls (if not NULL) gets the class of a failure: CV_ECONFIG when
 * the URL is bad or the broker refused the login (RabbitMQ ACCESS_REFUSED, a vhost
 * that does not exist; Redis AUTH refused, NOAUTH, a bad database number), CV_ERETRY
 * when it cannot be reached. err never holds the URL's password. */
struct broker *broker_open_class(const struct cfg *cfg, enum transport t, int *cls, char *err, size_t errlen);
void broker_close(struct broker *b);
const char *broker_error(const struct broker *b); /* last error text; never NULL */
/* RabbitMQ: declares exchanges, every queue, its bindings and dead-letter queue.
 * Redis: nothing to do. */
int broker_declare(struct broker *b);
/* Publishes one command to QUEUE (Redis) or to the commands exchange with
 * routing key TYPE (RabbitMQ) and returns once the broker has it (confirm /
 * reply). CV_EFATAL when the broker refused it (unroutable), CV_ERETRY when
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
};
/* Publishes n commands with one wait for the broker (a window of confirms /
 * one pipeline), as broker_publish_command does one. On an error none of them
 * may be taken as published (some may have been). */
int broker_publish_commands(struct broker *b, const struct outgoing_command *c, int n);
/* Starts consuming QUEUE as worker WORKER_ID. Redis: first returns to the queue
 * whatever an earlier process with this worker id left in flight. */
int broker_consume(struct broker *b, const struct cfg_queue *q, const char *worker_id);
/* Waits up to timeout_ms for a message. Returns 1 with *d filled (caller
 * delivery_free()s it), 0 on timeout, CV_ERETRY when the connection broke. */
int broker_next(struct broker *b, struct delivery *d, int timeout_ms);
/* Takes up to max messages already waiting, without waiting (Redis: in one
 * round trip, and no more than the queue's waiting messages divided by its
 * workers, rounded up, so that a backlog spreads over them). Returns how many
 * it put in d[0..], or CV_ERETRY when the connection broke and none was taken. */
int broker_take(struct broker *b, struct delivery *d, int max);
/* Removes the message for good (after commit), now. */
int broker_ack(struct broker *b, const struct delivery *d);
/* Removes a batch of n messages for good, in the order they arrived; every
 * message delivered before them must be settled already. The backend may hold
 * the ack and send it with the next take, in the same round trip (RabbitMQ:
 * one multiple ack for consecutive batches, sent before the consumer waits or
 * once it covers half the prefetch; Redis: in the script that takes the next
 * batch), and sends what it holds on broker_close. Until then a crash hands
 * the messages out again, and the worker finds them done. Returns 0 or an
 * error class. */
int broker_ack_batch(struct broker *b, const struct delivery *d, int n);
/* Puts the message back on its queue, for a later attempt. */
int broker_requeue(struct broker *b, const struct delivery *d);
/* Moves the message, untouched, to the queue's dead letters with why. */
int broker_dead_letter(struct broker *b, const struct delivery *d, const char *reason,
                       const char *error, int attempts);
/* Moves the message, untouched, out of the way for delay_ms, after which it is
 * back on its queue (RabbitMQ: a delay queue whose TTL dead-letters back;
 * Redis: the retry sorted set, moved back by broker_maintain). */
int broker_retry(struct broker *b, const struct delivery *d, int delay_ms);
/* Redis housekeeping, run by the reaper: moves due retries back to their queues
 * and returns the in-flight messages of workers whose heartbeat expired.
 * Returns the number of messages moved. RabbitMQ: nothing to do, returns 0. */
int broker_maintain(struct broker *b);

/* A dead letter as the admin command sees it; every string owned. */
struct dead_letter {
    char *body;            /* the original message, untouched */
    size_t len;
    char *message_id;      /* RabbitMQ property, or NULL */
    char *reason, *error, *failed_at;
    int attempts;
};
void dead_letters_free(struct dead_letter *d, int n);
/* Chooses dead letters: index counts from 1 in list order (oldest first). */
typedef bool (*dead_select_fn)(const struct dead_letter *d, int index, void *arg);
/* Reads the dead letters of q without removing them: *out (caller frees with
 * dead_letters_free) and *n. */
int broker_dead_read(struct broker *b, const struct cfg_queue *q, struct dead_letter **out, int *n);
/* Removes the dead letters of q that sel chooses; with requeue, each is first
 * published again, untouched, to q. *count is how many. */
int broker_dead_take(struct broker *b, const struct cfg_queue *q, dead_select_fn sel, void *arg,
                     bool requeue, int *count);
/* Publishes events in order and returns once the broker has all of them. */
int broker_publish_events(struct broker *b, const struct outgoing_event *ev, int n);
/* Starts receiving events whose type matches PATTERN (topic syntax), from now on. */
int broker_subscribe(struct broker *b, const char *pattern);
/* Waits up to timeout_ms for the next event: 1 with *json (caller frees),
 * 0 on timeout, negative on error. */
int broker_next_event(struct broker *b, char **json, int timeout_ms);

/* Names of things, from the prefix (buffers of at least 256 bytes). */
void names_amqp_queue(const struct cfg *c, const char *queue, char *out, size_t n);
void names_amqp_dead(const struct cfg *c, const char *queue, char *out, size_t n);
void names_redis(const struct cfg *c, const char *kind, const char *queue, char *out, size_t n);

#endif
