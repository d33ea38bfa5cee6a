/* amqp_subscription_admin.c - a durable subscription's counts and its
 * removal on RabbitMQ (docs/contract.md section 13): partition i of
 * subscription NAME is the queue <prefix>.sub.NAME.i, bound to the hash
 * exchange <prefix>.sub.NAME.
 *
 * AMQP tells a queue's ready messages and consumers (a passive declare) but
 * not the age of its oldest message without taking it: the counts' oldest
 * age is -1 here; the pools derive it from when they last saw the queues
 * empty (docs/contract.md section 13, "Lag").
 */
#include "amqp_internal.h"

#include <stdio.h>

/* core.h broker_subscription_counts on RabbitMQ: the ready messages of every
 * partition queue summed into out->lag, and their consumers into
 * out->consumers (passive declares on a channel of their own: a queue that
 * does not exist counts 0); oldest_age_s -1 (unknown), gap false. Returns 0,
 * or a class with the reason in b->err (*out then partly filled). */
int amqp_subscription_counts(struct broker *b, const struct subscription_spec *s, struct subscription_counts *out) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    *out = (struct subscription_counts){.lag = 0, .oldest_age_s = -1, .consumers = 0, .gap = false};
    for (int i = 0; i < s->partitions; i++) {
        char name[256];
        long messages = 0, consumers = 0;
        names_amqp_subscription_partition(a->base.cfg, s->name, i, name, sizeof name);
        int rc = amqp_passive_probe(a, name, &messages, &consumers, NULL);
        if (rc < 0) return rc;
        out->lag += messages;
        out->consumers += consumers;
    }
    return 0;
}

/* core.h broker_subscription_remove on RabbitMQ: queue.delete of each
 * partition queue (with the messages it holds, whatever its consumers), then
 * exchange.delete of the subscription's exchange (its bindings go with it).
 * RabbitMQ answers delete-ok for one that does not exist. Returns 0, or a
 * class with the reason in b->err (the publish connection is then dropped;
 * what was deleted before stays deleted: run it again). */
int amqp_subscription_remove(struct broker *b, const struct subscription_spec *s) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    int rc = amqp_conn_open(a, &a->publish, true);
    if (rc < 0) return rc;
    char name[256], what[320];
    for (int i = 0; i < s->partitions; i++) {
        names_amqp_subscription_partition(a->base.cfg, s->name, i, name, sizeof name);
        amqp_queue_delete(a->publish, CHANNEL, amqp_cstring_bytes(name), 0, 0);
        snprintf(what, sizeof what, "deleting queue %s", name);
        if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish), what)) < 0) goto fail;
    }
    names_amqp_subscription(a->base.cfg, s->name, name, sizeof name);
    amqp_exchange_delete(a->publish, CHANNEL, amqp_cstring_bytes(name), 0);
    snprintf(what, sizeof what, "deleting exchange %s", name);
    if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish), what)) < 0) goto fail;
    return 0;
fail:
    amqp_conn_drop(&a->publish);
    return rc;
}
