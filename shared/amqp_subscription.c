/* amqp_subscription.c - a durable subscription's partitions on RabbitMQ
 * (docs/contract.md section 13): declaring its consistent-hash exchange
 * (bound to the events exchange with each pattern) and its partition queues
 * (quorum, single active consumer), consuming the partitions this process
 * owns on the consume connection (consumer tag "p<i>" per partition, each
 * with its prefetch), and acking one by one. Called by the operations
 * (broker_amqp.c's table); calls amqp_delivery.c and amqp_conn.c.
 *
 * Detaching a partition opens the consume connection anew with the partitions
 * left: RabbitMQ gives back every unacked delivery (of every partition) to the
 * partitions' next consumers, in order; an ack of a delivery of the older
 * connection (its gen) is not sent (it comes again, and the subscriber's inbox
 * finds it done). Rebalancing is rare, so one simple rule beats a cancel and
 * a requeue per delivery. */
#include "amqp_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct amqp_sub {
    char name[80];
    bool attached[SUBSCRIPTION_PARTITIONS_MAX];
    int prefetch;
    int64_t acked_ms; /* monotonic ms of the last ack sent */
};

#define ACK_SETTLE_MS 500 /* the acks' time to land before the consume connection closes (below) */

/* Drops the consume connection, half a second after the last ack at the
 * earliest: a quorum queue may ignore acks that arrive just before their
 * channel closes, and hand those messages out again
 * (rabbitmq/rabbitmq-server#10327; seen here on 3.10 as the last of 300
 * acked events coming again to the next process). */
static void drop_consume_settled(struct amqp_broker *a) {
    int64_t wait = a->sub ? a->sub->acked_ms + ACK_SETTLE_MS - clock_mono_ms() : 0;
    if (a->consume && wait > 0) {
        struct timespec ts = {0, (long)wait * 1000000L};
        nanosleep(&ts, NULL);
    }
    amqp_drop_consume(a);
}

int amqp_subscription_declare(struct broker *b, const struct subscription_spec *s) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    int rc = amqp_conn_open(a, &a->publish, true);
    if (rc < 0) return rc;
    char ex[256], q[256];
    names_amqp_subscription(b->cfg, s->name, ex, sizeof ex);
    amqp_exchange_declare(a->publish, CHANNEL, amqp_cstring_bytes(a->events_ex), amqp_cstring_bytes("topic"), 0, 1, 0,
                          0, amqp_empty_table);
    if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish), "declaring the events exchange")) < 0) goto fail;
    amqp_table_entry_t arg = {amqp_cstring_bytes("hash-header"), {AMQP_FIELD_KIND_UTF8, {0}}};
    arg.value.value.bytes = amqp_cstring_bytes("x-conveyor-aggregate");
    amqp_exchange_declare(a->publish, CHANNEL, amqp_cstring_bytes(ex), amqp_cstring_bytes("x-consistent-hash"), 0, 1,
                          0, 0, (amqp_table_t){1, &arg});
    if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish),
                              "declaring a subscription's exchange (x-consistent-hash: is the plugin "
                              "rabbitmq_consistent_hash_exchange enabled?)")) < 0)
        goto fail;
    /* the queues first, so that nothing routed to the exchange is dropped */
    for (int i = 0; i < s->partitions; i++) {
        names_amqp_subscription_partition(b->cfg, s->name, i, q, sizeof q);
        if ((rc = amqp_declare_durable_queue(a, q, true, true)) < 0) goto fail;
        amqp_queue_bind(a->publish, CHANNEL, amqp_cstring_bytes(q), amqp_cstring_bytes(ex), amqp_cstring_bytes("1"),
                        amqp_empty_table);
        if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish), "binding a subscription's partition")) < 0)
            goto fail;
    }
    for (int k = 0; k < s->npatterns; k++) {
        amqp_exchange_bind(a->publish, CHANNEL, amqp_cstring_bytes(ex), amqp_cstring_bytes(a->events_ex),
                           amqp_cstring_bytes(s->patterns[k]), amqp_empty_table);
        if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish), "binding a subscription to the events")) < 0)
            goto fail;
    }
    return 0;
fail:
    amqp_conn_drop(&a->publish);
    return rc;
}

/* basic.consume of partition i under the tag "p<i>". Returns 0 or a class
 * (the consume connection is then dropped). */
static int consume_partition(struct amqp_broker *a, int i) {
    char q[256], tag[16];
    names_amqp_subscription_partition(a->base.cfg, a->sub->name, i, q, sizeof q);
    snprintf(tag, sizeof tag, "p%d", i);
    return amqp_consume_queue(a, q, tag, NULL, 0);
}

/* Opens the consume connection and consumes every attached partition.
 * Returns 0 or a class (every partition is then detached). */
static int consume_attached(struct amqp_broker *a) {
    int rc = amqp_consume_open(a, a->sub->prefetch);
    for (int i = 0; rc == 0 && i < SUBSCRIPTION_PARTITIONS_MAX; i++)
        if (a->sub->attached[i]) rc = consume_partition(a, i);
    if (rc < 0) memset(a->sub->attached, 0, sizeof a->sub->attached);
    return rc;
}

int amqp_subscription_attach(struct broker *b, const struct subscription_spec *s, int partition, int prefetch) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (partition < 0 || partition >= s->partitions) return broker_fail(b, CV_EREFUSED, "no partition %d", partition);
    if (!a->sub) a->sub = xcalloc(1, sizeof *a->sub);
    if (strcmp(a->sub->name, s->name) != 0) {
        memset(a->sub, 0, sizeof *a->sub);
        snprintf(a->sub->name, sizeof a->sub->name, "%s", s->name);
    }
    if (a->sub->attached[partition]) return 0;
    a->sub->prefetch = prefetch < 1 ? 1 : prefetch > 65535 ? 65535 : prefetch;
    if (!a->consume) {
        a->sub->attached[partition] = true;
        return consume_attached(a);
    }
    int rc = consume_partition(a, partition);
    if (rc < 0) {
        memset(a->sub->attached, 0, sizeof a->sub->attached);
        return rc;
    }
    a->sub->attached[partition] = true;
    return 0;
}

int amqp_subscription_detach(struct broker *b, int partition) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (a->sub && partition < 0) { /* every partition: the connection goes once */
        memset(a->sub->attached, 0, sizeof a->sub->attached);
        drop_consume_settled(a);
        return 0;
    }
    if (!a->sub || partition >= SUBSCRIPTION_PARTITIONS_MAX || !a->sub->attached[partition]) return 0;
    a->sub->attached[partition] = false;
    drop_consume_settled(a); /* everything unacked goes back (the file's comment) */
    bool any = false;
    for (int i = 0; i < SUBSCRIPTION_PARTITIONS_MAX; i++) any |= a->sub->attached[i];
    return any ? consume_attached(a) : 0;
}

/* The partition of a delivery from its consumer tag "p<i>" into *out: true,
 * or false for a tag of another kind. */
static bool tag_partition(amqp_bytes_t tag, int *out) {
    if (tag.len < 2 || tag.len > 4 || ((const char *)tag.bytes)[0] != 'p') return false;
    int i = 0;
    for (size_t k = 1; k < tag.len; k++) {
        char c = ((const char *)tag.bytes)[k];
        if (c < '0' || c > '9') return false;
        i = i * 10 + (c - '0');
    }
    *out = i;
    return i < SUBSCRIPTION_PARTITIONS_MAX;
}

int amqp_subscription_keepalive(struct broker *b) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (!a->consume) return 0;
    amqp_frame_t f = {.frame_type = AMQP_FRAME_HEARTBEAT, .channel = 0};
    if (amqp_send_frame(a->consume, &f) == AMQP_STATUS_OK) return 0;
    amqp_drop_consume(a);
    if (a->sub) memset(a->sub->attached, 0, sizeof a->sub->attached);
    return broker_fail(b, CV_ERETRY, "rabbitmq: the subscription's connection was lost (a heartbeat could not be sent)");
}

int amqp_subscription_fetch(struct broker *b, struct sub_delivery *out, int max, const int *room, int timeout_ms) {
    (void)room; /* the prefetch per partition's consumer bounds it */
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (!a->sub || !a->consume) {
        if (a->sub) memset(a->sub->attached, 0, sizeof a->sub->attached);
        return broker_fail(b, CV_ERETRY, "rabbitmq: the subscription's consumers were lost");
    }
    int n = 0;
    while (n < max) {
        amqp_envelope_t env;
        int rc = amqp_read_delivery(a, &env, n == 0 ? timeout_ms : 0);
        if (rc < 0) {
            memset(a->sub->attached, 0, sizeof a->sub->attached);
            for (int k = 0; k < n; k++) sub_delivery_free(&out[k]);
            return rc;
        }
        if (rc == 0) break;
        int p = -1;
        if (!tag_partition(env.consumer_tag, &p) || !a->sub->attached[p]) { /* not ours (a cancelled consumer's): it comes back with the connection */
            amqp_destroy_envelope(&env);
            continue;
        }
        struct sub_delivery *d = &out[n++];
        memset(d, 0, sizeof *d);
        d->json = amqp_copy_bytes(env.message.body);
        d->len = env.message.body.len;
        d->partition = p;
        d->tag = env.delivery_tag;
        d->gen = a->consume_gen;
        d->redelivered = env.redelivered;
        amqp_destroy_envelope(&env);
    }
    return n;
}

int amqp_subscription_ack(struct broker *b, const struct sub_delivery *d) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (d->gen != a->consume_gen || !a->consume) return 0; /* its connection is gone: it comes again */
    amqp_send_ack(a, d->tag, false);
    if (a->sub) a->sub->acked_ms = clock_mono_ms();
    return a->consume ? 0 : broker_fail(b, CV_ERETRY, "rabbitmq: the acknowledgement was lost");
}
