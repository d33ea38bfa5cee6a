/* broker_backend.h - what a broker backend provides (broker_amqp.c, broker_redis.c).
 * Only broker.c and the backends include this. */
#ifndef CONVEYOR_BROKER_BACKEND_H
#define CONVEYOR_BROKER_BACKEND_H

#include "core.h"

struct broker_ops {
    void (*close)(struct broker *b);
    int (*declare)(struct broker *b);
    int (*publish_commands)(struct broker *b, const struct outgoing_command *c, int n);
    int (*consume)(struct broker *b, const struct cfg_queue *q, const char *worker_id);
    int (*next)(struct broker *b, struct delivery *d, int timeout_ms);
    /* optional: several already-waiting messages at once (else next, timeout 0, in a loop) */
    int (*take)(struct broker *b, struct delivery *d, int max);
    int (*ack)(struct broker *b, const struct delivery *d);
    /* may hold the ack and send it with the next take (broker_ack_batch) */
    int (*ack_batch)(struct broker *b, const struct delivery *d, int n);
    int (*requeue)(struct broker *b, const struct delivery *d);
    int (*release)(struct broker *b, const struct delivery *d);
    /* optional: a backend that delivers ahead of a take (else nothing to hand over) */
    int (*stop_consuming)(struct broker *b, struct delivery *d, int max);
    int (*dead_letter)(struct broker *b, const struct delivery *d, const char *reason,
                       const char *error, int attempts, const char *dead_id);
    int (*retry)(struct broker *b, const struct delivery *d, int delay_ms);
    int (*maintain)(struct broker *b);
    /* Walks the dead letters of q oldest first: with out, collects them all;
     * with sel, removes (and with requeue re-publishes) the chosen ones. */
    int (*dead_walk)(struct broker *b, const struct cfg_queue *q, dead_select_fn sel, void *arg, bool requeue,
                     int *count, struct dead_letter **out, int *n);
    /* optional: a page of the dead letters without taking them (else CV_EREFUSED) */
    int (*dead_page)(struct broker *b, const struct cfg_queue *q, long offset, int limit, struct dead_letter **out,
                     int *n);
    int (*dead_count)(struct broker *b, const struct cfg_queue *q, long *n);
    int (*queue_counts)(struct broker *b, const struct cfg_queue *q, struct queue_counts *out);
    int (*publish_events)(struct broker *b, const struct outgoing_event *ev, int n);
    int (*subscribe)(struct broker *b, const char *pattern);
    int (*next_event)(struct broker *b, char **json, int timeout_ms);
    /* optional (laned queues, core.h: broker_sort_lanes, broker_lane_counts) */
    int (*sort_lanes)(struct broker *b, const struct cfg_queue *q, int max, int timeout_ms);
    int (*lane_counts)(struct broker *b, const struct cfg_queue *q, struct lane_count *out);
    void (*lane_oldest)(struct broker *b, int64_t *out);
    /* durable subscriptions (core.h: broker_subscription_*) */
    int (*subscription_declare)(struct broker *b, const struct subscription_spec *s);
    int (*subscription_attach)(struct broker *b, const struct subscription_spec *s, int partition, int prefetch);
    int (*subscription_detach)(struct broker *b, int partition);
    int (*subscription_fetch)(struct broker *b, struct sub_delivery *out, int max, const int *room, int timeout_ms);
    int (*subscription_keepalive)(struct broker *b);
    int (*subscription_ack)(struct broker *b, const struct sub_delivery *d);
    int (*subscription_counts)(struct broker *b, const struct subscription_spec *s, struct subscription_counts *out);
    int (*subscription_remove)(struct broker *b, const struct subscription_spec *s);
};

/* Every backend's state starts with this header. */
struct broker {
    const struct broker_ops *ops;
    const struct cfg *cfg;              /* not owned */
    const struct cfg_queue *queue;      /* set by consume */
    int worker_index;                   /* set by consume: which lanes of a laned queue (-1: every lane) */
    char err[512];
};

/* Open a connection: NULL with a message in err and the class of the failure in *cls (broker_open_class). */
struct broker *broker_amqp_open(const struct cfg *cfg, int *cls, char *err, size_t errlen);
struct broker *broker_redis_open(const struct cfg *cfg, int *cls, char *err, size_t errlen);

/* Frees the fields of one dead letter (not d itself). */
void dead_letter_clear(struct dead_letter *d);

/* Sets b->err and returns code. */
int broker_fail(struct broker *b, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
