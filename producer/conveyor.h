/*
 * conveyor.h - publish Conveyor commands from C, and wait for their results.
 *
 *   char err[512], id[37], *event;
 *   conveyor_client *c = conveyor_open("queues.conf", CONVEYOR_WAIT, err, sizeof err, NULL);
 *   conveyor_publish(c, "updateStock", "{\"productId\":\"...\",\"quantityChange\":-2}", NULL, id);
 *   int rc = conveyor_wait(c, id, 10000, &event);   // 0: success event, CONVEYOR_REJECTED, ...
 *   free(event);
 *   conveyor_close(c);
 *
 * Functions return 0 or a negative CONVEYOR_E* code; the text of the last
 * error is conveyor_error(c). Strings returned through out-parameters are
 * malloc'd and owned by the caller. A client is not thread-safe.
 *
 * SIGPIPE: ignore it in a program that uses the library (signal(SIGPIPE,
 * SIG_IGN) at start, as conveyor-produce does). The Redis client (hiredis)
 * writes without MSG_NOSIGNAL, so a write to a connection the server reset
 * raises SIGPIPE, whose default action ends the process; ignored, the write
 * fails with EPIPE and the library treats it as a lost broker (retried or,
 * with a spool, spooled).
 *
 * Installed as the shared library libconveyor (README, "The C library"):
 *   cc prog.c $(pkg-config --cflags --libs conveyor)
 * or in CMake find_package(Conveyor) and the target Conveyor::conveyor.
 */
#ifndef CONVEYOR_H
#define CONVEYOR_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct conveyor_client conveyor_client;

/* The public codes, a set of their own: stable values (a program may compare
 * or store them), distinct from the internal error classes of Conveyor's
 * library (CV_E* of shared/core.h, which this header never exposes). Some
 * values coincide (-1, -2, -3, -4 are CV_E* classes too) but the meanings do
 * not: compare a conveyor_* result only with these names. docs/contract.md,
 * "The C client's codes". */
enum {
    CONVEYOR_OK = 0,
    CONVEYOR_EINVALID = -1,  /* the command is not a valid envelope, or no queue routes its type */
    CONVEYOR_EBROKER = -2,   /* the broker could not be reached or refused the message */
    CONVEYOR_ETIMEOUT = -3,  /* no result event in time */
    CONVEYOR_REJECTED = -4,  /* the result is command.rejected */
    CONVEYOR_EFULL = -5,     /* the command's queue is full (its max_length): refused, not queued; not
                              * retried by the client (publish it again once the queue drains) */
    CONVEYOR_ESPOOL = -6,    /* the offline spool (conveyor_set_spool) is full, locked by another process,
                              * corrupt or cannot be written: the message says which; not spooled */
};

/* Subscribe to result events at open, so conveyor_wait() sees every result
 * of a command published after it. */
#define CONVEYOR_WAIT 1

/* Reads the configuration (and the CONVEYOR_* environment). With CONVEYOR_WAIT
 * it connects to the events broker and subscribes; the brokers of commands are
 * connected by the first publish that needs them. Returns the client (the caller
 * conveyor_close()s it), or NULL on failure, with a message in err and, if code
 * is not NULL, CONVEYOR_EINVALID (configuration, including a broker that
 * refused it: credentials, a certificate; or out of memory) or
 * CONVEYOR_EBROKER (the broker could not be reached) in *code. */
conveyor_client *conveyor_open(const char *config_path, int flags, char *err, size_t errlen, int *code);
/* Closes the connections and frees c, with any result not waited for; NULL is fine. */
void conveyor_close(conveyor_client *c);
/* The text of the last error, kept in c until the next one (a success does not
 * clear it); "no client" for NULL. Never NULL. */
const char *conveyor_error(const conveyor_client *c);
/* 1 when the last CONVEYOR_EBROKER of c was the broker refusing the
 * configuration, which will not pass by itself: a bad URL, credentials, a
 * vhost, a client certificate the server refused, a server certificate that is
 * not trusted or not for the host (conveyor-produce exits 2 then, not 3); 0
 * otherwise (the broker could not be reached, or refused the message), and for
 * NULL. */
int conveyor_config_error(const conveyor_client *c);

/* Publishes one command and returns once the broker has confirmed it.
 * payload_json must be a JSON object; correlation_id may be NULL. Writes the
 * new command id to id_out (37 bytes) on success (and see CONVEYOR_EBROKER). Returns 0,
 * CONVEYOR_EINVALID (the payload is not a JSON object, the envelope breaks a
 * rule, no queue routes type), or CONVEYOR_EBROKER (the broker could not be
 * reached or refused it, RabbitMQ's topology could not be declared, or out of
 * memory). A broker reached before and lost now (a RabbitMQ node, a Redis
 * primary gone; a nack; replicas that did not confirm in time) is reached
 * again, through the next node of the URL list or Sentinel, and the command
 * sent again with the same id while producer.publish_retry_ms (default 30 s)
 * has not passed; a broker never reached, or one that refuses the command,
 * fails at once. On CONVEYOR_EBROKER id_out holds the command's id too: the
 * command may have been queued, so publish it again with that id
 * (conveyor_publish_envelope), never as a new one. After a broker failure the
 * connection is closed, and opened again by the next publish.
 * CONVEYOR_EFULL: the queue that routes type has a max_length and holds that
 * many waiting commands: the command was refused and is not queued (RabbitMQ:
 * the policy's nack, or the client's own count before sending; Redis: the
 * client's atomic count-and-push). It is not sent again as for a lost broker;
 * id_out holds its id, which may be published again once the queue drains.
 * With a spool (conveyor_set_spool, below) a broker that cannot be reached
 * spools the command instead (0), and CONVEYOR_ESPOOL says the spool is full
 * or cannot be written: the command is neither sent nor spooled. */
int conveyor_publish(conveyor_client *c, const char *type, const char *payload_json,
                     const char *correlation_id, char id_out[37]);
/* As conveyor_publish, for a command that must not run before not_before: an
 * RFC 3339 date-time with an offset ("2026-12-24T18:00:00+01:00", "...Z"), the
 * envelope's notBefore (docs/contract.md). A pool that takes it earlier parks it
 * in PostgreSQL and runs it once that time has passed by the database's clock;
 * a time already past runs it at once. NULL not_before is conveyor_publish.
 * CONVEYOR_EINVALID when not_before is not such a date-time. */
int conveyor_publish_at(conveyor_client *c, const char *type, const char *payload_json,
                        const char *correlation_id, const char *not_before, char id_out[37]);
/* Publishes a whole envelope ({"type", "payload"} at least; id and createdAt
 * are added when missing, and replace an id or createdAt that is not a string;
 * a string that is not a UUID / RFC 3339 date-time is CONVEYOR_EINVALID).
 * Writes the command id to id_out on success. Returns as conveyor_publish. */
int conveyor_publish_envelope(conveyor_client *c, const char *envelope_json, char id_out[37]);
/* Publishes n envelopes (as conveyor_publish_envelope) with one wait for the
 * broker's confirms, the fast way to send many. For each i: ids[i] gets the
 * command id once confirmed, or "" when it was not sent; errors[i] gets a
 * malloc'd reason when envelope i was invalid (the caller frees it), else NULL.
 * Returns 0 when every valid envelope was confirmed (also when some or all were
 * invalid), or CONVEYOR_EBROKER (then none is reported sent, though some may
 * have been: publish them again, the ids make that safe; also out of memory),
 * or CONVEYOR_EFULL: a bounded queue was full; then ids[i] is the id of each
 * envelope that was confirmed, and "" (errors[i] NULL) for each one refused
 * (not queued): a refused one may be followed by confirmed ones when the
 * queue drained meanwhile, or when they go to another queue. With a spool:
 * CONVEYOR_ESPOOL when the spool was full (or cannot be written): ids[i] is
 * the id of each envelope sent or spooled, and "" (errors[i] NULL) for each
 * one neither sent nor spooled (the spool takes them in order, none after
 * the first it cannot take). */
int conveyor_publish_batch(conveyor_client *c, const char *const *envelopes, int n, char (*ids)[37],
                           char **errors);
/* Waits for the result event of command id (needs CONVEYOR_WAIT): the first
 * event of that command. Returns 0 for a success event, CONVEYOR_REJECTED for
 * command.rejected (either way the event JSON is in *event_json, malloc'd: the
 * caller frees it; NULL otherwise), CONVEYOR_ETIMEOUT, or CONVEYOR_EINVALID when
 * the client was opened without CONVEYOR_WAIT or did not publish id. A result
 * is handed out once: waiting again for the same id times out. A lost
 * subscription is made again, not returned: events published meanwhile are
 * missed (their commands then time out). */
int conveyor_wait(conveyor_client *c, const char *id, int timeout_ms, char **event_json);

/* The offline spool (docs/contract.md, "The C client's codes"; README, "The
 * offline spool"). With a spool, a publish the broker cannot take (it cannot be
 * reached, or was lost, or did not confirm: not a refusal) is appended to a file
 * in dir and fsync'd before the call returns 0: durably accepted, its id in
 * id_out, sent later in order with the same id (workers apply an id once,
 * within dedup.retention_days: flush well before). While
 * anything waits in the spool, new commands go behind it: a publish first sends
 * what waits (trying the broker at most once a second while it is away), and
 * spools the new command when that does not empty the spool. So a publish that
 * returns 0 with conveyor_spooled(c) > 0 went to the spool. Without a spool, a
 * lost broker is waited for (producer.publish_retry_ms); with one, the spool is
 * the retry: it spools at once. Never spooled: an invalid command
 * (CONVEYOR_EINVALID), a full queue (CONVEYOR_EFULL; also while a full queue
 * holds up the spool's first command), a broker that refuses the configuration
 * or the message (CONVEYOR_EBROKER). Nothing runs in the background: what waits
 * is sent by the client's own calls (a publish, conveyor_flush). */

/* Gives c a spool in dir (made, mode 0700, when missing): locks it against a
 * second writer (flock: one process per directory; a fork()ed child is refused
 * too, CONVEYOR_ESPOOL: it opens a spool of its own) and checks it, cutting off
 * an append that did not finish at its end (a crash mid-append: its bytes kept
 * in dir/spool.log.torn-OFFSET; a warning on stderr names them; the same text
 * in conveyor_error). max_bytes bounds the file (<= 0: the configuration's
 * producer.spool_max_bytes, 64 MiB by default). Sends nothing: the next publish
 * or conveyor_flush does. dir NULL closes c's spool. Returns 0, or
 * CONVEYOR_ESPOOL (locked by another process, a corrupt record in the middle,
 * or the directory cannot be used; the message says which) and c keeps no spool. */
int conveyor_set_spool(conveyor_client *c, const char *dir, long long max_bytes);
/* Sends what waits in c's spool, in order, with confirms, and empties the file
 * once all is sent (at most about INT_MAX commands a call: call again while
 * conveyor_spooled(c) > 0). Returns how many it sent (0: nothing waited), or
 * CONVEYOR_EBROKER (the broker cannot be reached or refused a spooled command;
 * what was confirmed before is sent, the rest waits: call again),
 * CONVEYOR_EFULL (the first waiting command's queue is full: it waits),
 * CONVEYOR_EINVALID (c has no spool, or a spooled command no queue routes now),
 * CONVEYOR_ESPOOL (the file cannot be read or written). */
int conveyor_flush(conveyor_client *c);
/* The commands waiting in c's spool; 0 without a spool, and for NULL. */
long long conveyor_spooled(const conveyor_client *c);
/* What waits in the spool in dir, read without its lock (a writer may hold it)
 * and without changing it: *records commands, the file's *bytes, and the
 * createdAt of the oldest in oldest ("" when none waits); any may be NULL.
 * A directory without a spool holds none. Returns 0, or CONVEYOR_ESPOOL with
 * the reason in err (a missing directory, a corrupt record in the middle, a
 * read error). */
int conveyor_spool_status(const char *dir, long long *records, long long *bytes, char oldest[40], char *err,
                          size_t errlen);


/* ---- Durable subscriptions (docs/contract.md section 13) --------------------------------
 *
 *   const char *patterns[] = {"stock.*", NULL};
 *   conveyor_subscription *s = conveyor_subscription_open("queues.conf", "stock-view", patterns, NULL,
 *                                                         err, sizeof err, NULL);
 *   conveyor_event *ev;
 *   while (conveyor_subscription_next(s, 1000, &ev) >= 0) {
 *       if (!ev) continue;                                  // nothing within the timeout
 *       if (apply(ev->json) == 0) conveyor_subscription_ack(s, ev);  // frees ev
 *       else conveyor_subscription_nack(s, ev, "why");     // again later; frees ev
 *   }
 *   conveyor_subscription_close(s);
 *
 * One handle is used by one thread at a time. Events of one aggregate are handed
 * out one at a time, in commit order: the next one of an aggregate comes after
 * the one before was acked (or dead-lettered). Events of other aggregates may be
 * handed out while some are outstanding (up to the partition's bound). */

typedef struct conveyor_subscription conveyor_subscription;

/* One event handed out by conveyor_subscription_next; owned by the library
 * until conveyor_subscription_ack or _nack frees it (every one must get one of
 * the two; conveyor_subscription_close frees those that did not, and they come
 * again). */
typedef struct conveyor_event {
    const char *id;           /* the event id (UUID text) */
    const char *type;         /* the event type, e.g. "stock.updated" */
    const char *aggregate_id; /* "" when the event has none */
    const char *json;         /* the event's JSON, as published (NUL-terminated) */
    size_t len;               /* strlen(json) */
    int attempt;              /* 1 the first time this process hands it out, then 2, 3, ... */
    int partition;            /* the partition it came from; -1 for a replayed or a dead letter retried */
} conveyor_event;

/* Options of conveyor_subscription_open; NULL for all the defaults. Zeroed
 * fields are defaults; set size to sizeof(struct conveyor_subscription_options). */
struct conveyor_subscription_options {
    size_t size;
    const char *from;      /* where a new subscription starts: NULL or "newest", "oldest",
                            * an RFC 3339 time, or an event id (contract section 13) */
    int partitions;        /* a new subscription's partitions, 1-64 (0: 4) */
    int max_attempts;      /* nacks before an event is dead-lettered (0: 5) */
    int retry_base_ms;     /* the first retry's delay, doubled per attempt up to 60 s (0: 1000) */
    const char *transport; /* "rabbitmq" or "redis" (NULL: the configuration's events transport) */
};

/* Opens (and, the first time, creates) the subscription name with the
 * NULL-terminated patterns (NULL or empty: the existing subscription's, or
 * "#" for a new one), reading the configuration at config_path for the
 * brokers and Conveyor's database. Returns the handle (conveyor_subscription_close
 * frees it), or NULL with the reason in err and, if code is not NULL, *code:
 * CONVEYOR_EINVALID (a bad name, pattern or option, an existing subscription
 * with other patterns, transport or from: err names what it has; the
 * configuration, or a login the broker or database refused) or
 * CONVEYOR_EBROKER (the broker or the database could not be reached). */
conveyor_subscription *conveyor_subscription_open(const char *config_path, const char *name,
                                                  const char *const *patterns,
                                                  const struct conveyor_subscription_options *opts, char *err,
                                                  size_t errlen, int *code);
/* Waits up to timeout_ms for the next event: returns 0 with *ev set (NULL when
 * none came in time), or CONVEYOR_EBROKER when the broker or the database
 * was lost (the reason in conveyor_subscription_error; call again: it
 * reconnects, and what it held comes again). */
int conveyor_subscription_next(conveyor_subscription *s, int timeout_ms, conveyor_event **ev);
/* The event was handled: acknowledges it and frees ev. Returns 0, or
 * CONVEYOR_EBROKER (the acknowledgement was lost: the event may come again). */
int conveyor_subscription_ack(conveyor_subscription *s, conveyor_event *ev);
/* The event failed (reason: a short text, may be NULL): it comes again after
 * the retry delay, later events of its aggregate wait behind it; after
 * max_attempts it is written to the subscription's dead letters and
 * acknowledged. Frees ev. Returns 0 (1 when it was dead-lettered), or
 * CONVEYOR_EBROKER. */
int conveyor_subscription_nack(conveyor_subscription *s, conveyor_event *ev, const char *reason);
/* Does the subscription's once-a-second work (its session in Conveyor's
 * database, the partitions' balance, dead letters asked again) without
 * handing out an event: call it about once a second while a handler runs for
 * long. A process that calls neither this nor _next for 60 s loses its
 * partitions to the others (its session ends: contract section 13). Returns
 * 0 or CONVEYOR_EBROKER. */
int conveyor_subscription_poll(conveyor_subscription *s);
/* The last error's message; never NULL. */
const char *conveyor_subscription_error(const conveyor_subscription *s);
/* Gives up the partitions (what is not acked comes again, to another process)
 * and frees s; NULL is a no-op. */
void conveyor_subscription_close(conveyor_subscription *s);

#ifdef __cplusplus
}
#endif
#endif
