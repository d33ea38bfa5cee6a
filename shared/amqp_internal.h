/* amqp_internal.h - what the pieces of the RabbitMQ backend share; only they
 * include it. The pieces, and the one way calls go between them:
 *
 *   broker_amqp.c    the operations, the tables of them, broker_amqp_open
 *     -> amqp_lanes.c    a laned queue's worker: its lane consumers and their buffer
 *     -> amqp_sort.c     the sorter's step: the intake into the lanes
 *     -> amqp_delivery.c the consume connection: reading deliveries, headers, acks
 *     -> amqp_publish.c  publishing with confirms and their deadline
 *     -> amqp_conn.c     the node list, opening a connection (TLS, login), the
 *                        bounds on a silent node, RPC replies as classes
 *   amqp_lanes.c, amqp_sort.c -> amqp_delivery.c, amqp_publish.c, amqp_conn.c
 *   amqp_delivery.c, amqp_publish.c -> amqp_conn.c
 *
 * None of them calls back up that list; all of them may use broker_common.c
 * (broker_backend.h). */
#ifndef CONVEYOR_AMQP_INTERNAL_H
#define CONVEYOR_AMQP_INTERNAL_H

#include "broker_backend.h"

#include <amqp.h>

#define CHANNEL 1 /* the one channel of each connection that carries messages */

/* One RabbitMQ broker: its two connections (amqp_conn.c opens them) and what
 * the operations keep. */
struct amqp_broker {
    struct broker base;
    amqp_connection_state_t consume, publish;
    uint64_t publish_tag;      /* last delivery tag used on the publish channel */
    int64_t publish_heard_ms;  /* monotonic ms the publish connection last answered (probe_idle) */
    bool probe_open;           /* PROBE_CHANNEL is open on the publish connection (passive_count) */
    char *url;                 /* the node's URL in use; amqp_parse_url writes into this copy */
    struct amqp_connection_info info;
    int nurls, url_at;         /* rabbitmq.url lists nurls nodes; info is of node url_at */
    char queue[256], dead[256];
    char commands_ex[256], events_ex[256];
    bool consuming;
    char consumer_tag[256];    /* the server's name for the consumer (basic.consume-ok), for basic.cancel */
    int prefetch;
    uint64_t ack_held;         /* a multiple ack up to this tag, not sent yet (0: none) */
    int ack_held_n;            /* how many deliveries it covers */
    bool tls_unclear;          /* the last login broke on a TLS error that named no reason (login) */
    uint64_t consume_gen;      /* counts the consume connections dropped: a tag of an older one is dead */
    struct amqp_lanes *lanes;  /* a laned queue's consumer (amqp_lanes.c), or NULL */
    struct amqp_sub *sub;      /* a subscription's attached partitions (amqp_subscription.c), or NULL */
    uint64_t sort_gen;         /* the sorter consumes the intake on consume connection number sort_gen */
    bool sorting;              /* ... once it started (amqp_sort.c) */
};

/* One message to publish with confirms. */
struct amqp_msg {
    const char *exchange, *routing_key;
    const void *body;
    size_t len;
    const char *message_id, *type;
    amqp_table_t headers;
    const char *expiration;    /* per-message TTL in ms, or NULL */
};

/* ---- amqp_conn.c: the connections ----------------------------------------------------- */

/* Counts the nodes of rabbitmq.url into a->nurls and makes the node this
 * process reached last (at first the first) the one a->info describes; a->base.cfg
 * must be set. Opens nothing. Returns 0, or CV_ECONFIG with the reason in
 * a->base.err (a bad URL); a->url is then the caller's to free. */
int amqp_conn_start(struct amqp_broker *a);
/* Opens *out (a->consume or a->publish) with channel 1, in confirm mode when
 * confirms, unless it is open (a->publish idle for long is probed first): on
 * the current node, else on the next ones of the list in turn. Returns 0, or
 * the class of the last failure with its reason in a->base.err (CV_ECONFIG at
 * once when a node refuses the login or a certificate). *out is owned by a. */
int amqp_conn_open(struct amqp_broker *a, amqp_connection_state_t *out, bool confirms);
/* Closes *c with the close handshake (bounded), destroys it and sets it NULL;
 * a NULL *c is a no-op. Errors are ignored: the connection is gone either way. */
void amqp_conn_drop(amqp_connection_state_t *c);
/* As amqp_conn_drop without the handshake: for a silent server. */
void amqp_conn_drop_silent(amqp_connection_state_t *c);
/* A bound fired on a silent node: says so (broker_note BROKER_SILENT, the log),
 * sets the reason (fmt) in a->base.err, and moves this broker, and the next
 * broker this process opens, to the next node of the list. Returns CV_ERETRY;
 * the caller drops the connection (amqp_conn_drop_silent). */
int amqp_conn_silent(struct amqp_broker *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* An RPC reply as 0, or a class with the reason in a->base.err (what names the
 * request): CV_EREFUSED when the server refused it, CV_ERETRY when the
 * connection failed (after amqp_conn_silent when a bound fired). On a class
 * the caller drops the connection. */
int amqp_conn_check(struct amqp_broker *a, amqp_rpc_reply_t r, const char *what);

/* ---- amqp_delivery.c: the consume connection ------------------------------------------ */

/* A NUL-terminated malloc'd copy of bytes (an empty body has bytes == NULL);
 * aborts when out of memory (xmalloc): a delivery has no error to return. */
char *amqp_copy_bytes(amqp_bytes_t b);
/* Drops the consume connection (a->consume_gen counts it); its delivery tags,
 * and an ack held for them, go with it: RabbitMQ redelivers what was unacked. */
void amqp_drop_consume(struct amqp_broker *a);
/* Opens the consume connection (with channel 1) unless it is open, and sets
 * the prefetch of the consumers started after it (basic.qos, per consumer).
 * Returns 0, or a class with the connection dropped. */
int amqp_consume_open(struct amqp_broker *a, int prefetch);
/* basic.consume of queue name on the consume channel, under the consumer tag
 * tag (NULL: the server names it, and the name goes into server_tag, n bytes,
 * when not NULL). Returns 0, or a class with the connection dropped. */
int amqp_consume_queue(struct amqp_broker *a, const char *name, const char *tag, char *server_tag, size_t n);
/* Acks tag (with multiple, every delivery up to it) on the consume channel;
 * a failure is logged (the message comes back and is found done) and drops
 * the connection. */
void amqp_send_ack(struct amqp_broker *a, uint64_t tag, bool multiple);
/* Reads one delivery from the consume connection into *env (the caller
 * amqp_destroy_envelope()s it): 1, 0 on timeout (0 ms: only what is already
 * there), or CV_ERETRY (the connection is dropped, the reason in a->base.err). */
int amqp_read_delivery(struct amqp_broker *a, amqp_envelope_t *env, int timeout_ms);
/* The entry named key of a header table (h may be NULL), or NULL. */
amqp_table_entry_t *amqp_find_header(amqp_table_t *h, const char *key);
/* A header as a string (NULL if absent or not a string; the caller frees it); h may be NULL. */
char *amqp_header_str(amqp_table_t *h, const char *key);
/* Sets *e to the header traceparent = value (borrowed); returns 1, or 0 when value is NULL. */
int amqp_traceparent_header(amqp_table_entry_t *e, const char *value);
/* Whether env came back (redelivered, x-death, x-conveyor-redelivered): a handler may have started on it. */
bool amqp_envelope_redelivered(amqp_envelope_t *env);
/* *d (emptied first) filled from env: owned copies of body, message_id, traceparent. */
void amqp_delivery_fill(amqp_envelope_t *env, struct delivery *d);

/* ---- amqp_lanes.c: a laned queue's worker --------------------------------------------- */

/* Starts consuming the lanes of the laned queue q (q->lanes >= 2) that worker
 * number worker_index serves (-1: every lane): a->lanes set (freed by
 * amqp_lanes_free). Sends nothing yet. Returns 0. */
int amqp_lanes_consume(struct amqp_broker *a, const struct cfg_queue *q, int worker_index);
/* The broker operations next, take and stop_consuming of a laned worker
 * (core.h: broker_next, broker_take, broker_stop_consuming). */
int amqp_lanes_next(struct broker *b, struct delivery *d, int timeout_ms);
int amqp_lanes_take(struct broker *b, struct delivery *d, int max);
int amqp_lanes_stop(struct broker *b, struct delivery *d, int max);
/* core.h broker_lane_oldest: the oldest createdAt of each lane's buffer (its
 * deliveries' header x-conveyor-created-ms) into out where older. */
void amqp_lanes_oldest(struct broker *b, int64_t *out);
/* Frees l and the deliveries it still buffers (NULL is fine). */
void amqp_lanes_free(struct amqp_lanes *l);

/* ---- amqp_sort.c: the sorter's step --------------------------------------------------- */

/* core.h broker_sort_lanes on RabbitMQ. */
int amqp_sort_lanes(struct broker *b, const struct cfg_queue *q, int max, int timeout_ms);

/* ---- amqp_publish.c: publishing with confirms ----------------------------------------- */

/* Publishes the n messages m (borrowed) on the publish connection (opened if
 * need be) and waits for the broker to confirm every one. Returns 0,
 * CV_EREFUSED when one was unroutable (with mandatory) or the channel was
 * refused, CV_ERETRY when one was nacked or the connection failed or was
 * silent (it is then dropped), with the reason in a->base.err. */
int amqp_publish_confirmed(struct amqp_broker *a, const struct amqp_msg *m, int n, bool mandatory);
/* As amqp_publish_confirmed, and nacked (n entries, zeroed by the caller; NULL:
 * not wanted) tells which messages the broker nacked once every confirm came
 * (then CV_ERETRY, the connection kept): a bounded queue's reject-publish. */
int amqp_publish_confirmed_each(struct amqp_broker *a, const struct amqp_msg *m, int n, bool mandatory,
                                bool *nacked);


/* ---- broker_amqp.c, for the other pieces ------------------------------------------------- */
/* Declares the durable queue name on the publish connection (quorum or
 * classic; single_active: x-single-active-consumer). Returns 0 or a class
 * (the caller drops the publish connection). */
int amqp_declare_durable_queue(struct amqp_broker *a, const char *name, bool quorum, bool single_active);
/* The messages ready in queue name and its consumers (either may be NULL) by a
 * passive declare on a channel of its own; *exists (may be NULL) says whether
 * it exists (a missing one counts 0). Returns 0 or a class. */
int amqp_passive_probe(struct amqp_broker *a, const char *name, long *messages, long *consumers, bool *exists);

/* ---- amqp_subscription.c: a durable subscription's partitions (core.h) ----------------- */
int amqp_subscription_declare(struct broker *b, const struct subscription_spec *s);
int amqp_subscription_attach(struct broker *b, const struct subscription_spec *s, int partition, int prefetch);
int amqp_subscription_detach(struct broker *b, int partition);
int amqp_subscription_fetch(struct broker *b, struct sub_delivery *out, int max, const int *room, int timeout_ms);
int amqp_subscription_keepalive(struct broker *b);
int amqp_subscription_ack(struct broker *b, const struct sub_delivery *d);

/* ---- amqp_subscription_admin.c: a subscription's counts, and its removal (core.h) -------- */
int amqp_subscription_counts(struct broker *b, const struct subscription_spec *s, struct subscription_counts *out);
int amqp_subscription_remove(struct broker *b, const struct subscription_spec *s);

#endif
