/* broker.c - the broker interface: dispatch to the RabbitMQ or Redis backend
 * (what the backends share with it is in broker_common.c). */
#include "broker_backend.h"

#include <stdlib.h>

#include <stdio.h>

struct broker *broker_open(const struct cfg *cfg, enum transport t, char *err, size_t errlen) {
    return broker_open_class(cfg, t, NULL, err, errlen);
}

struct broker *broker_open_class(const struct cfg *cfg, enum transport t, int *cls, char *err, size_t errlen) {
    int c = CV_ERETRY;
    struct broker *b = t == TRANSPORT_REDIS ? broker_redis_open(cfg, &c, err, errlen)
                                            : broker_amqp_open(cfg, &c, err, errlen);
    if (cls) *cls = b ? 0 : c;
    return b;
}

/* What broker_open_wait waits on: a transport of a configuration. */
struct open_args {
    const struct cfg *cfg;
    enum transport t;
};

static void *open_transport(const void *arg, int *cls, char *err, size_t errlen) {
    const struct open_args *a = arg;
    return broker_open_class(a->cfg, a->t, cls, err, errlen);
}

struct broker *broker_open_wait(const struct cfg *cfg, enum transport t, volatile sig_atomic_t *stop, char *err,
                                size_t errlen) {
    struct open_args a = {cfg, t};
    return backoff_open(open_transport, &a, t == TRANSPORT_REDIS ? "Redis" : "RabbitMQ", stop, err, errlen);
}

int broker_declare_topology(const struct cfg *cfg, char *err, size_t errlen) {
    if (!cfg_uses(cfg, TRANSPORT_RABBITMQ)) return 0;
    int rc;
    struct broker *b = broker_open_class(cfg, TRANSPORT_RABBITMQ, &rc, err, errlen);
    if (b && (rc = broker_declare(b)) < 0) snprintf(err, errlen, "%s", broker_error(b));
    broker_close(b);
    return rc;
}

int broker_declare(struct broker *b) { return b->ops->declare(b); }

int broker_publish_command(struct broker *b, const struct cfg_queue *q, const char *type,
                           const char *body, size_t len, const char *message_id) {
    struct outgoing_command c = {q, type, body, len, message_id, NULL};
    return b->ops->publish_commands(b, &c, 1);
}

int broker_publish_commands(struct broker *b, const struct outgoing_command *c, int n) {
    return n > 0 ? b->ops->publish_commands(b, c, n) : 0;
}

int broker_consume(struct broker *b, const struct cfg_queue *q, const char *worker_id) {
    return broker_consume_as(b, q, worker_id, -1);
}

int broker_consume_as(struct broker *b, const struct cfg_queue *q, const char *worker_id, int worker_index) {
    b->queue = q;
    b->worker_index = worker_index;
    return b->ops->consume(b, q, worker_id);
}

int broker_sort_lanes(struct broker *b, const struct cfg_queue *q, int max, int timeout_ms) {
    if (q->lanes < 2 || !b->ops->sort_lanes) return 0;
    return b->ops->sort_lanes(b, q, max, timeout_ms);
}

int broker_lane_counts(struct broker *b, const struct cfg_queue *q, struct lane_count *out) {
    for (int i = 0; i < LANE_CLASSES * q->lanes; i++) out[i] = (struct lane_count){0, -1};
    if (q->lanes < 2) return 0;
    if (!b->ops->lane_counts) return broker_fail(b, CV_EREFUSED, "this broker cannot count lanes yet");
    return b->ops->lane_counts(b, q, out);
}

bool broker_lane_oldest(struct broker *b, int64_t *out) {
    if (!b || !b->ops->lane_oldest) return false;
    b->ops->lane_oldest(b, out);
    return true;
}

int broker_next(struct broker *b, struct delivery *d, int timeout_ms) {
    return b->ops->next(b, d, timeout_ms);
}

int broker_take(struct broker *b, struct delivery *d, int max) {
    if (b->ops->take) return max > 0 ? b->ops->take(b, d, max) : 0;
    int n = 0, rc = 0;
    while (n < max && (rc = b->ops->next(b, &d[n], 0)) > 0) n++;
    return n > 0 || rc >= 0 ? n : rc;
}

int broker_ack(struct broker *b, const struct delivery *d) { return b->ops->ack(b, d); }
int broker_ack_batch(struct broker *b, const struct delivery *d, int n) { return n > 0 ? b->ops->ack_batch(b, d, n) : 0; }
int broker_requeue(struct broker *b, const struct delivery *d) { return b->ops->requeue(b, d); }
int broker_release(struct broker *b, const struct delivery *d) { return b->ops->release(b, d); }
int broker_stop_consuming(struct broker *b, struct delivery *d, int max) {
    return b->ops->stop_consuming && max > 0 ? b->ops->stop_consuming(b, d, max) : 0;
}

int broker_dead_letter(struct broker *b, const struct delivery *d, const char *reason,
                       const char *error, int attempts, const char *dead_id) {
    return b->ops->dead_letter(b, d, reason, error, attempts, dead_id);
}

int broker_retry(struct broker *b, const struct delivery *d, int delay_ms) {
    return b->ops->retry(b, d, delay_ms);
}

int broker_maintain(struct broker *b) { return b->ops->maintain(b); }

int broker_dead_read(struct broker *b, const struct cfg_queue *q, struct dead_letter **out, int *n) {
    *out = NULL;
    *n = 0;
    b->queue = q;
    return b->ops->dead_walk(b, q, NULL, NULL, false, NULL, out, n);
}

int broker_dead_take(struct broker *b, const struct cfg_queue *q, dead_select_fn sel, void *arg,
                     bool requeue, int *count) {
    *count = 0;
    b->queue = q;
    return b->ops->dead_walk(b, q, sel, arg, requeue, count, NULL, NULL);
}

int broker_dead_page(struct broker *b, const struct cfg_queue *q, long offset, int limit, struct dead_letter **out,
                     int *n) {
    *out = NULL;
    *n = 0;
    if (!b->ops->dead_page) return broker_fail(b, CV_EREFUSED, "this broker cannot read dead letters without taking them");
    if (offset < 0 || limit < 1) return broker_fail(b, CV_EREFUSED, "a page needs an offset >= 0 and a limit >= 1");
    return b->ops->dead_page(b, q, offset, limit, out, n);
}

int broker_dead_count(struct broker *b, const struct cfg_queue *q, long *n) {
    *n = 0;
    return b->ops->dead_count(b, q, n);
}

int broker_queue_counts(struct broker *b, const struct cfg_queue *q, struct queue_counts *out) {
    *out = (struct queue_counts){0, -1, 0, 0, -1};
    return b->ops->queue_counts(b, q, out);
}

int broker_publish_events(struct broker *b, const struct outgoing_event *ev, int n) {
    return n > 0 ? b->ops->publish_events(b, ev, n) : 0;
}

int broker_subscribe(struct broker *b, const char *pattern) { return b->ops->subscribe(b, pattern); }

int broker_next_event(struct broker *b, char **json, int timeout_ms) {
    return b->ops->next_event(b, json, timeout_ms);
}

int broker_subscription_declare(struct broker *b, const struct subscription_spec *s) {
    return b->ops->subscription_declare(b, s);
}

int broker_subscription_attach(struct broker *b, const struct subscription_spec *s, int partition, int prefetch) {
    return b->ops->subscription_attach(b, s, partition, prefetch);
}

int broker_subscription_detach(struct broker *b, int partition) { return b->ops->subscription_detach(b, partition); }

int broker_subscription_fetch(struct broker *b, struct sub_delivery *out, int max, const int *room, int timeout_ms) {
    return b->ops->subscription_fetch(b, out, max, room, timeout_ms);
}

int broker_subscription_keepalive(struct broker *b) { return b->ops->subscription_keepalive(b); }

int broker_subscription_ack(struct broker *b, const struct sub_delivery *d) { return b->ops->subscription_ack(b, d); }

int broker_subscription_counts(struct broker *b, const struct subscription_spec *s, struct subscription_counts *out) {
    return b->ops->subscription_counts(b, s, out);
}

int broker_subscription_remove(struct broker *b, const struct subscription_spec *s) {
    return b->ops->subscription_remove(b, s);
}

