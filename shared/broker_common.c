/* broker_common.c - what the broker interface (broker.c) and its backends
 * (broker_amqp.c, broker_redis.c) both use, so that calls go one way, from
 * broker.c to the backends and from all three to here: the context's error,
 * closing through the backend's table, the names of queues and keys, freeing
 * deliveries and dead letters, and the process's broker-stall listener. */
#include "broker_backend.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void broker_close(struct broker *b) {
    if (b) b->ops->close(b);
}

const char *broker_error(const struct broker *b) { return b ? b->err : "no broker"; }

int broker_fail(struct broker *b, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->err, sizeof b->err, fmt, ap);
    va_end(ap);
    return code;
}

void dead_letter_clear(struct dead_letter *d) {
    free(d->body);
    free(d->message_id);
    free(d->reason);
    free(d->error);
    free(d->failed_at);
    free(d->dead_id);
    memset(d, 0, sizeof *d);
}

void dead_letters_free(struct dead_letter *d, int n) {
    for (int i = 0; d && i < n; i++) dead_letter_clear(&d[i]);
    free(d);
}

void delivery_free(struct delivery *d) {
    if (!d) return;
    free(d->body);
    free(d->message_id);
    free(d->traceparent);
    d->body = d->message_id = d->traceparent = NULL;
}

void names_amqp_queue(const struct cfg *c, const char *queue, char *out, size_t n) {
    snprintf(out, n, "%s.%s", c->prefix, queue);
}

void names_amqp_dead(const struct cfg *c, const char *queue, char *out, size_t n) {
    snprintf(out, n, "%s.%s.dead", c->prefix, queue);
}

void names_amqp_lane(const struct cfg *c, const char *queue, int cls, int lane, char *out, size_t n) {
    snprintf(out, n, "%s.%s.lane.%s.%d", c->prefix, queue, lane_class_name(cls), lane);
}

void names_amqp_lanes_exchange(const struct cfg *c, const char *queue, int cls, char *out, size_t n) {
    snprintf(out, n, "%s.%s.lanes.%s", c->prefix, queue, lane_class_name(cls));
}

void sub_delivery_free(struct sub_delivery *d) {
    free(d->json);
    d->json = NULL;
}

void names_amqp_subscription(const struct cfg *c, const char *name, char *out, size_t n) {
    snprintf(out, n, "%s.sub.%s", c->prefix, name);
}

void names_amqp_subscription_partition(const struct cfg *c, const char *name, int i, char *out, size_t n) {
    snprintf(out, n, "%s.sub.%s.%d", c->prefix, name, i);
}

void names_redis_subscription_group(const char *name, int i, char *out, size_t n) {
    snprintf(out, n, "sub:%s:%d", name, i);
}

void names_redis_subscription_consumer(const char *name, int i, char *out, size_t n) {
    snprintf(out, n, "%s:%d", name, i);
}

void names_redis_lane(const struct cfg *c, const char *queue, int cls, int lane, char *out, size_t n) {
    snprintf(out, n, "%s:queue:%s:lane:%s:%d", c->prefix, queue, lane_class_name(cls), lane);
}

/* kind: "queue", "inflight", "retry", "dead", "events", "worker"; queue may be NULL */
void names_redis(const struct cfg *c, const char *kind, const char *queue, char *out, size_t n) {
    if (queue) snprintf(out, n, "%s:%s:%s", c->prefix, kind, queue);
    else snprintf(out, n, "%s:%s", c->prefix, kind);
}

/* The process's stall listener (broker_stall_hook); NULL: none. */
static broker_stall_fn stall_hook;

void broker_stall_hook(broker_stall_fn fn) { stall_hook = fn; }

void broker_note(enum broker_note note, int budget_ms) {
    if (stall_hook) stall_hook(note, budget_ms);
}
