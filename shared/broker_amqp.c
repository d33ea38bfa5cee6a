/* broker_amqp.c - the RabbitMQ backend (librabbitmq-c 0.11, AMQP 0-9-1): its
 * operations (the table of struct broker_ops) and broker_amqp_open. The
 * connections and the node list are amqp_conn.c, publishing with confirms
 * amqp_publish.c (amqp_internal.h).
 *
 * Two connections, each opened on first use and dropped on any error (the next
 * call re-opens it): "consume" carries basic.consume deliveries and acks;
 * "publish" is in confirm mode and only publishes, so confirms never interleave
 * with deliveries. Topology: docs/contract.md, "RabbitMQ". An amqps:// URL opens
 * both over TLS (amqp_conn.c's new_socket: the one place a RabbitMQ socket is
 * made).
 */
#include "amqp_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Sends the held multiple ack, if any. */
static void send_held_ack(struct amqp_broker *a) {
    uint64_t tag = a->ack_held;
    a->ack_held = 0;
    a->ack_held_n = 0;
    if (tag) amqp_send_ack(a, tag, true);
}

static void amqp_close_broker(struct broker *b) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    broker_note(BROKER_IDLE, 0);
    send_held_ack(a);
    amqp_drop_consume(a);
    amqp_conn_drop(&a->publish);
    amqp_lanes_free(a->lanes);
    free(a->sub); /* what a subscription's attach kept (amqp_subscription.c) */
    free(a->url);
    free(a);
}

/* Declares the durable queue name (quorum or classic; with single_active, one
 * consumer at a time: x-single-active-consumer). Returns 0 or a class. */
static int declare_queue(struct amqp_broker *a, const char *name, bool quorum, bool single_active) {
    amqp_table_entry_t e[2] = {{amqp_cstring_bytes("x-queue-type"), {AMQP_FIELD_KIND_UTF8, {0}}},
                               {amqp_cstring_bytes("x-single-active-consumer"), {AMQP_FIELD_KIND_BOOLEAN, {0}}}};
    e[0].value.value.bytes = amqp_cstring_bytes(quorum ? "quorum" : "classic");
    e[1].value.value.boolean = 1;
    amqp_table_t args = {single_active ? 2 : 1, e};
    amqp_queue_declare(a->publish, CHANNEL, amqp_cstring_bytes(name), 0, 1, 0, 0, args);
    char what[300];
    snprintf(what, sizeof what, "declaring queue %s", name);
    return amqp_conn_check(a, amqp_get_rpc_reply(a->publish), what);
}

/* The lanes of the laned queue q (docs/contract.md, "Lanes"): per class its
 * consistent-hash exchange, and its lane queues bound to it with weight "1".
 * Returns 0 or a class (the caller drops the publish connection). */
static int declare_lanes(struct amqp_broker *a, const struct cfg_queue *q) {
    int rc = 0;
    for (int c = 0; c < LANE_CLASSES && rc == 0; c++) {
        char ex[256];
        names_amqp_lanes_exchange(a->base.cfg, q->name, c, ex, sizeof ex);
        amqp_exchange_declare(a->publish, CHANNEL, amqp_cstring_bytes(ex), amqp_cstring_bytes("x-consistent-hash"),
                              0, 1, 0, 0, amqp_empty_table);
        if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish),
                                  "declaring a lanes exchange (x-consistent-hash: is the plugin "
                                  "rabbitmq_consistent_hash_exchange enabled?)")) < 0)
            break;
        for (int i = 0; i < q->lanes && rc == 0; i++) {
            char lane[256];
            names_amqp_lane(a->base.cfg, q->name, c, i, lane, sizeof lane);
            if ((rc = declare_queue(a, lane, q->quorum, q->ordered)) < 0) break;
            amqp_queue_bind(a->publish, CHANNEL, amqp_cstring_bytes(lane), amqp_cstring_bytes(ex),
                            amqp_cstring_bytes("1"), amqp_empty_table);
            rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish), "binding a lane");
        }
    }
    return rc;
}

static int passive_count(struct amqp_broker *a, const char *name, long *messages, long *consumers);
/* As passive_count, and *exists (if not NULL) says whether the queue exists. */
static int passive_probe(struct amqp_broker *a, const char *name, long *messages, long *consumers, bool *exists);

/* The lane queues of q beyond q->lanes that an earlier configuration made
 * (lanes lowered): unbound from their class's exchange, so the sorter routes
 * nothing more into them; what one still holds is said in the log (it waits
 * there: move it to the intake, where it is sorted again). Returns 0 or a
 * class (the caller drops the publish connection). */
static int retire_lanes(struct amqp_broker *a, const struct cfg_queue *q) {
    int rc = 0;
    for (int c = 0; c < LANE_CLASSES && rc == 0; c++)
        for (int i = q->lanes; i < LANES_MAX && rc == 0; i++) {
            char ex[256], lane[256];
            long waiting = 0;
            bool exists = false;
            names_amqp_lane(a->base.cfg, q->name, c, i, lane, sizeof lane);
            if ((rc = passive_probe(a, lane, &waiting, NULL, &exists)) < 0 || !exists) continue;
            names_amqp_lanes_exchange(a->base.cfg, q->name, c, ex, sizeof ex);
            amqp_queue_unbind(a->publish, CHANNEL, amqp_cstring_bytes(lane), amqp_cstring_bytes(ex),
                              amqp_cstring_bytes("1"), amqp_empty_table);
            if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish), "unbinding a lane beyond lanes")) < 0) break;
            if (waiting > 0)
                log_warn("lane queue %s is beyond %s's lanes = %d now: unbound, it still holds %ld command%s "
                         "(move them to the queue %s.%s to have them sorted again)", lane, q->name, q->lanes,
                         waiting, waiting == 1 ? "" : "s", a->base.cfg->prefix, q->name);
        }
    return rc;
}

static int amqp_declare(struct broker *b) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    int rc = amqp_conn_open(a, &a->publish, true);
    if (rc < 0) return rc;
    amqp_exchange_declare(a->publish, CHANNEL, amqp_cstring_bytes(a->commands_ex), amqp_cstring_bytes("direct"),
                          0, 1, 0, 0, amqp_empty_table);
    if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish), "declaring the commands exchange")) < 0) goto out;
    amqp_exchange_declare(a->publish, CHANNEL, amqp_cstring_bytes(a->events_ex), amqp_cstring_bytes("topic"),
                          0, 1, 0, 0, amqp_empty_table);
    if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish), "declaring the events exchange")) < 0) goto out;
    for (int i = 0; i < b->cfg->nqueues; i++) {
        const struct cfg_queue *q = &b->cfg->queues[i];
        if (q->transport != TRANSPORT_RABBITMQ) continue;
        char name[256], dead[256];
        names_amqp_queue(b->cfg, q->name, name, sizeof name);
        names_amqp_dead(b->cfg, q->name, dead, sizeof dead);
        if ((rc = declare_queue(a, name, q->quorum, false)) < 0 || (rc = declare_queue(a, dead, q->quorum, false)) < 0)
            goto out;
        for (int j = 0; j < q->ncommands; j++) {
            amqp_queue_bind(a->publish, CHANNEL, amqp_cstring_bytes(name), amqp_cstring_bytes(a->commands_ex),
                            amqp_cstring_bytes(q->commands[j]), amqp_empty_table);
            if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish), "binding a command type")) < 0) goto out;
        }
        if (q->lanes >= 2 && ((rc = declare_lanes(a, q)) < 0 || (rc = retire_lanes(a, q)) < 0)) goto out;
    }
out:
    if (rc < 0) amqp_conn_drop(&a->publish);
    return rc;
}


/* Bounded queues, before sending: each queue of c with max_length has room for
 * max_length minus its waiting messages (a passive declare per queue); the
 * commands beyond it, in c's order, get refused[i]. Returns 0 or a class. */
static int mark_no_room(struct amqp_broker *a, const struct outgoing_command *c, int n, bool *refused) {
    for (int i = 0; i < n; i++) {
        if (c[i].q->max_length <= 0) continue;
        bool seen = false;
        for (int j = 0; j < i && !seen; j++) seen = c[j].q == c[i].q;
        if (seen) continue; /* counted with its queue's first command */
        char name[256];
        long waiting = 0;
        names_amqp_queue(a->base.cfg, c[i].q->name, name, sizeof name);
        int rc = passive_count(a, name, &waiting, NULL);
        if (rc < 0) return rc;
        long room = c[i].q->max_length - waiting;
        for (int j = i; j < n; j++)
            if (c[j].q == c[i].q && !(refused[j] = room <= 0)) room--;
    }
    return 0;
}

/* After a nack: each nacked command whose queue has max_length and is found
 * full (its waiting messages at or above it: the policy's reject-publish) is
 * refused[i]. Returns 0 when every nack was such a refusal, else CV_ERETRY (a
 * nack for another reason: send them again) or a class of the probe. */
static int nacks_were_full(struct amqp_broker *a, const struct outgoing_command *c, const int *idx, int k,
                           const bool *nacked, bool *refused) {
    for (int m = 0; m < k; m++) {
        if (!nacked[m]) continue;
        const struct cfg_queue *q = c[idx[m]].q;
        char name[256];
        long waiting = 0;
        names_amqp_queue(a->base.cfg, q->name, name, sizeof name);
        int rc = q->max_length > 0 ? passive_count(a, name, &waiting, NULL) : 0;
        if (rc < 0) return rc;
        if (q->max_length <= 0 || waiting < q->max_length)
            return broker_fail(&a->base, CV_ERETRY, "rabbitmq refused (basic.nack) the message: not taken now");
        refused[idx[m]] = true;
    }
    return 0;
}

/* Sets *refused of each command (when asked) and, when some were refused,
 * the CV_EFULL message; returns rc, or CV_EFULL for a success with refusals. */
static int report_refused(struct broker *b, const struct outgoing_command *c, int n, const bool *refused, int rc) {
    int nref = 0, first = -1;
    for (int i = 0; i < n; i++) {
        if (c[i].refused) *c[i].refused = rc == 0 && refused[i];
        if (refused[i] && first < 0) first = i;
        nref += refused[i];
    }
    if (rc < 0 || nref == 0) return rc;
    char name[256];
    names_amqp_queue(b->cfg, c[first].q->name, name, sizeof name);
    return broker_fail(b, CV_EFULL, "queue %s is full (max_length %ld): %d of %d commands refused", name,
                       c[first].q->max_length, nref, n);
}

static int amqp_publish_commands(struct broker *b, const struct outgoing_command *c, int n) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    struct amqp_msg *m = calloc((size_t)n, sizeof *m);
    bool *refused = calloc((size_t)n, sizeof *refused), *nacked = calloc((size_t)n, sizeof *nacked);
    int *idx = calloc((size_t)n, sizeof *idx), k = 0;
    if (!m || !refused || !nacked || !idx) {
        free(m);
        free(refused);
        free(nacked);
        free(idx);
        return broker_fail(b, CV_ERETRY, "rabbitmq: out of memory");
    }
    int rc = mark_no_room(a, c, n, refused);
    for (int i = 0; rc == 0 && i < n; i++) {
        if (refused[i]) continue;
        idx[k] = i;
        m[k++] = (struct amqp_msg){a->commands_ex, c[i].type, c[i].body, c[i].len, c[i].message_id, c[i].type,
                                   amqp_empty_table, NULL};
    }
    if (rc == 0) rc = amqp_publish_confirmed_each(a, m, k, true, nacked);
    if (rc == CV_ERETRY && a->publish) { /* every confirm came: some were nacked */
        bool any = false;
        for (int j = 0; j < k; j++) any = any || nacked[j];
        if (any) rc = nacks_were_full(a, c, idx, k, nacked, refused);
    }
    rc = report_refused(b, c, n, refused, rc);
    free(m);
    free(refused);
    free(nacked);
    free(idx);
    return rc;
}

static const struct broker_ops *lane_ops(void);

static int amqp_consume(struct broker *b, const struct cfg_queue *q, const char *worker_id) {
    (void)worker_id;
    struct amqp_broker *a = (struct amqp_broker *)b;
    names_amqp_queue(b->cfg, q->name, a->queue, sizeof a->queue);
    names_amqp_dead(b->cfg, q->name, a->dead, sizeof a->dead);
    a->prefetch = q->prefetch > q->batch_size ? q->prefetch : q->batch_size; /* a batch is what is delivered */
    a->consuming = true;
    if (q->lanes >= 2) { /* its lanes, not the intake (the sorter's): the lane table's operations */
        b->ops = lane_ops();
        return amqp_lanes_consume(a, q, b->worker_index);
    }
    return 0; /* basic.consume is sent when the consume connection opens */
}

static int start_consuming(struct amqp_broker *a) {
    if (a->consume) return 0;
    int rc = amqp_consume_open(a, a->prefetch);
    if (rc == 0) rc = amqp_consume_queue(a, a->queue, NULL, a->consumer_tag, sizeof a->consumer_tag);
    return rc;
}

static int amqp_next(struct broker *b, struct delivery *d, int timeout_ms) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    memset(d, 0, sizeof *d);
    /* the held ack goes before the consumer waits (amqp_ack_batch sends it
     * sooner once it covers half the prefetch) */
    if (a->ack_held && timeout_ms > 0) send_held_ack(a);
    int rc = start_consuming(a);
    if (rc < 0) return rc;
    amqp_envelope_t env;
    if ((rc = amqp_read_delivery(a, &env, timeout_ms)) <= 0) return rc;
    amqp_delivery_fill(&env, d);
    amqp_destroy_envelope(&env);
    return 1;
}

static int amqp_ack(struct broker *b, const struct delivery *d) {
    amqp_send_ack((struct amqp_broker *)b, d->tag, false);
    return 0;
}

/* Every delivery up to the batch's last is settled: one multiple ack covers
 * them, held so that consecutive batches share it, until it covers half the
 * prefetch or the consumer is about to wait (amqp_next). */
static int amqp_ack_batch(struct broker *b, const struct delivery *d, int n) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (!a->consume) return amqp_ack(b, d); /* gone with the channel: logged, redelivered, found done */
    for (int i = 0; i < n; i++)
        if (d[i].tag > a->ack_held) a->ack_held = d[i].tag;
    a->ack_held_n += n;
    /* half the prefetch: the broker would soon stop delivering */
    if (a->ack_held_n >= (a->prefetch + 1) / 2) send_held_ack(a);
    return 0;
}

static int amqp_requeue(struct broker *b, const struct delivery *d) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (!a->consume) return 0; /* unacked on a closed channel: already back on the queue */
    int rc = amqp_basic_nack(a->consume, CHANNEL, d->tag, 0, 1);
    if (rc != AMQP_STATUS_OK) {
        amqp_drop_consume(a);
        return broker_fail(b, CV_ERETRY, "rabbitmq nack: %s", amqp_error_string2(rc));
    }
    return 0;
}

/* A copy to the tail of the queue, confirmed, then the original acked: a
 * requeue would come back marked redelivered (one handler start counted). */
static int amqp_release(struct broker *b, const struct delivery *d) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    amqp_table_entry_t h[2];
    int nh = amqp_traceparent_header(&h[0], d->traceparent);
    if (d->redelivered) { /* it stays redelivered: a start of it may be uncounted */
        h[nh].key = amqp_cstring_bytes("x-conveyor-redelivered");
        h[nh].value.kind = AMQP_FIELD_KIND_BOOLEAN;
        h[nh++].value.value.boolean = 1;
    }
    struct amqp_msg m = {"", a->queue, d->body, d->len, d->message_id, NULL, {nh, h}, NULL};
    int rc = amqp_publish_confirmed(a, &m, 1, true);
    if (rc < 0) return rc;
    return amqp_ack(b, d);
}

/* A laned worker's deliveries are handed out of their tag order (amqp_lanes.c):
 * acked one by one, never by a multiple ack. */
static int amqp_ack_each(struct broker *b, const struct delivery *d, int n) {
    for (int i = 0; i < n; i++) amqp_send_ack((struct amqp_broker *)b, d[i].tag, false);
    return 0;
}

/* An ordered queue's lane delivery handed back (a release, a requeue): the
 * consume connection is dropped, which returns everything this worker holds
 * of its lanes to the head of each lane, in the order the lane delivered it
 * (RabbitMQ returns a gone consumer's messages in their checkout order). A
 * requeue of the one delivery would not keep the order: its lane would
 * deliver it again behind what the worker already holds of that lane. Each
 * comes back redelivered: one counted start (docs/contract.md, "Lanes").
 * What the worker still holds is then settled on a closed channel: an ack is
 * lost (the command comes back and is found done), a hand-back is a no-op.
 * Returns 0. */
static int hand_back_ordered(struct amqp_broker *a) {
    if (a->consume) log_debug("rabbitmq: an ordered lane's command handed back: its lanes get back all it holds");
    amqp_drop_consume(a);
    return 0;
}

/* An unordered queue's lane delivery as amqp_release: a copy to the intake
 * (sorted again), then acked; an ordered one: hand_back_ordered. */
static int amqp_lane_release(struct broker *b, const struct delivery *d) {
    if (!b->queue || !b->queue->ordered) return amqp_release(b, d);
    return hand_back_ordered((struct amqp_broker *)b);
}

/* An unordered queue's lane delivery as amqp_requeue; an ordered one: hand_back_ordered. */
static int amqp_lane_requeue(struct broker *b, const struct delivery *d) {
    if (!b->queue || !b->queue->ordered) return amqp_requeue(b, d);
    return hand_back_ordered((struct amqp_broker *)b);
}

/* basic.cancel; deliveries that arrived before its cancel-ok are kept by
 * librabbitmq (queued frames) and read here without waiting. */
static int amqp_stop_consuming(struct broker *b, struct delivery *d, int max) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (!a->consume) return 0; /* no channel: RabbitMQ has them back already */
    send_held_ack(a);
    if (!a->consume) return 0;
    amqp_basic_cancel(a->consume, CHANNEL, amqp_cstring_bytes(a->consumer_tag));
    int rc = amqp_conn_check(a, amqp_get_rpc_reply(a->consume), "basic.cancel");
    if (rc < 0) {
        amqp_drop_consume(a);
        return rc;
    }
    int n = 0;
    while (n < max && (rc = amqp_next(b, &d[n], 0)) > 0) n++;
    return n;
}

static int amqp_dead_letter(struct broker *b, const struct delivery *d, const char *reason,
                            const char *error, int attempts, const char *dead_id) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    char ts[32];
    clock_rfc3339(clock_ms(), ts);
    amqp_table_entry_t h[6];
    h[0].key = amqp_cstring_bytes("x-conveyor-reason");
    h[0].value.kind = AMQP_FIELD_KIND_UTF8;
    h[0].value.value.bytes = amqp_cstring_bytes(reason);
    h[1].key = amqp_cstring_bytes("x-conveyor-error");
    h[1].value.kind = AMQP_FIELD_KIND_UTF8;
    h[1].value.value.bytes = amqp_cstring_bytes(error);
    h[2].key = amqp_cstring_bytes("x-conveyor-attempts");
    h[2].value.kind = AMQP_FIELD_KIND_I32;
    h[2].value.value.i32 = attempts;
    h[3].key = amqp_cstring_bytes("x-conveyor-failed-at");
    h[3].value.kind = AMQP_FIELD_KIND_UTF8;
    h[3].value.value.bytes = amqp_cstring_bytes(ts);
    /* the message's own traceparent header goes with it (a retry from the dead letters keeps its trace) */
    int nh = 4 + amqp_traceparent_header(&h[4], d->traceparent);
    if (dead_id) { /* its row in the dead-letter index (workers/dead_index.c) */
        h[nh].key = amqp_cstring_bytes("x-conveyor-dead-id");
        h[nh].value.kind = AMQP_FIELD_KIND_UTF8;
        h[nh++].value.value.bytes = amqp_cstring_bytes(dead_id);
    }
    struct amqp_msg m = {"", a->dead, d->body, d->len, d->message_id, NULL, {nh, h}, NULL};
    int rc = amqp_publish_confirmed(a, &m, 1, true);
    if (rc < 0) return rc;
    return amqp_ack(b, d);
}

/* The name of q's delay queue of nominal delay ms: <queue>.retry.<ms> (classic,
 * at-most-once dead-lettering), or for a bounded queue <queue>.delay.<ms>
 * (quorum, at-least-once dead-lettering: a message that a full queue
 * refuses stays in it and is offered again, never dropped). */
static void delay_queue_name(const struct cfg *c, const struct cfg_queue *q, long ms, char *out, size_t n) {
    char name[256];
    names_amqp_queue(c, q->name, name, sizeof name);
    snprintf(out, n, "%s.%s.%ld", name, q->max_length > 0 ? "delay" : "retry", ms);
}

/* The delay queue for delay_ms (delay_queue_name), one per doubling of the
 * base delay, so messages of one queue expire in about the order they were put
 * in (a message expires only at the head of its queue); declared here. */
static int retry_queue(struct amqp_broker *a, int delay_ms, char *name, size_t n) {
    const struct cfg *c = a->base.cfg;
    long nominal = c->retry_base_ms;
    while (nominal < delay_ms && nominal < c->retry_max_ms) nominal *= 2;
    if (nominal > c->retry_max_ms) nominal = c->retry_max_ms;
    bool bounded = a->base.queue && a->base.queue->max_length > 0;
    if (a->base.queue) delay_queue_name(c, a->base.queue, nominal, name, n);
    else snprintf(name, n, "%s.retry.%ld", a->queue, nominal);
    amqp_table_entry_t e[5];
    const char *const kv[5][2] = {{"x-dead-letter-exchange", ""},
                                  {"x-dead-letter-routing-key", a->queue},
                                  {"x-queue-type", bounded ? "quorum" : "classic"},
                                  {"x-dead-letter-strategy", "at-least-once"},
                                  {"x-overflow", "reject-publish"}}; /* at-least-once needs it */
    for (int i = 0; i < 5; i++) {
        e[i].key = amqp_cstring_bytes(kv[i][0]);
        e[i].value.kind = AMQP_FIELD_KIND_UTF8;
        e[i].value.value.bytes = amqp_cstring_bytes(kv[i][1]);
    }
    amqp_table_t args = {bounded ? 5 : 3, e};
    int rc = amqp_conn_open(a, &a->publish, true);
    if (rc < 0) return rc;
    amqp_queue_declare(a->publish, CHANNEL, amqp_cstring_bytes(name), 0, 1, 0, 0, args);
    if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish), "declaring a delay queue")) < 0)
        amqp_conn_drop(&a->publish);
    return rc;
}

static int amqp_retry(struct broker *b, const struct delivery *d, int delay_ms) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    char name[300], expiration[24];
    int rc = retry_queue(a, delay_ms, name, sizeof name);
    if (rc < 0) return rc;
    snprintf(expiration, sizeof expiration, "%d", delay_ms);
    amqp_table_entry_t h[1];
    struct amqp_msg m = {"", name, d->body, d->len, d->message_id, NULL,
                         {amqp_traceparent_header(&h[0], d->traceparent), h}, NULL};
    m.expiration = expiration;
    if ((rc = amqp_publish_confirmed(a, &m, 1, true)) < 0) return rc;
    return amqp_ack(b, d);
}

static int amqp_maintain(struct broker *b) { (void)b; return 0; /* RabbitMQ redelivers and expires by itself */ }

/* A header of a dead letter as its integer (0 if absent). */
static int header_int(amqp_table_t *h, const char *key) {
    amqp_table_entry_t *e = amqp_find_header(h, key);
    switch (e ? e->value.kind : 0) {
    case AMQP_FIELD_KIND_I8: return e->value.value.i8;
    case AMQP_FIELD_KIND_U8: return e->value.value.u8;
    case AMQP_FIELD_KIND_I16: return e->value.value.i16;
    case AMQP_FIELD_KIND_U16: return e->value.value.u16;
    case AMQP_FIELD_KIND_I32: return e->value.value.i32;
    case AMQP_FIELD_KIND_U32: return (int)e->value.value.u32;
    case AMQP_FIELD_KIND_I64: return (int)e->value.value.i64;
    case AMQP_FIELD_KIND_U64: return (int)e->value.value.u64;
    default: return 0;
    }
}

/* Gets every message of the dead queue of q without acking; with sel, acks
 * (after re-publishing, with requeue) the chosen ones. Closing the connection
 * then returns the others to the dead queue, in order. */
static int amqp_dead_walk(struct broker *b, const struct cfg_queue *q, dead_select_fn sel, void *arg,
                          bool requeue, int *count, struct dead_letter **out, int *n) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    char dead[256], queue[256];
    names_amqp_dead(a->base.cfg, q->name, dead, sizeof dead);
    names_amqp_queue(a->base.cfg, q->name, queue, sizeof queue);
    amqp_drop_consume(a);
    int rc = amqp_conn_open(a, &a->consume, false), cap = 0, index = 0;
    if (rc < 0) return rc;
    while (rc == 0) {
        amqp_rpc_reply_t r = amqp_basic_get(a->consume, CHANNEL, amqp_cstring_bytes(dead), 0);
        if ((rc = amqp_conn_check(a, r, "reading the dead letters")) < 0) break;
        if (r.reply.id == AMQP_BASIC_GET_EMPTY_METHOD) break;
        uint64_t tag = ((amqp_basic_get_ok_t *)r.reply.decoded)->delivery_tag;
        amqp_message_t msg;
        if ((rc = amqp_conn_check(a, amqp_read_message(a->consume, CHANNEL, &msg, 0), "reading a dead letter")) < 0) break;
        struct dead_letter d;
        memset(&d, 0, sizeof d);
        d.len = msg.body.len;
        d.body = amqp_copy_bytes(msg.body);
        amqp_basic_properties_t *p = &msg.properties;
        amqp_table_t *h = (p->_flags & AMQP_BASIC_HEADERS_FLAG) ? &p->headers : NULL;
        if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) d.message_id = amqp_copy_bytes(p->message_id);
        d.reason = amqp_header_str(h, "x-conveyor-reason");
        d.error = amqp_header_str(h, "x-conveyor-error");
        d.failed_at = amqp_header_str(h, "x-conveyor-failed-at");
        d.attempts = header_int(h, "x-conveyor-attempts");
        d.dead_id = amqp_header_str(h, "x-conveyor-dead-id");
        char *traceparent = amqp_header_str(h, "traceparent");
        amqp_destroy_message(&msg);
        index++;
        if (sel && sel(&d, index, arg)) {
            if (requeue) {
                amqp_table_entry_t th[1];
                struct amqp_msg m = {"", queue, d.body, d.len, d.message_id, NULL,
                                     {amqp_traceparent_header(&th[0], traceparent), th}, NULL};
                if ((rc = amqp_publish_confirmed(a, &m, 1, true)) < 0) {
                    free(traceparent);
                    dead_letter_clear(&d);
                    break;
                }
            }
            if (amqp_basic_ack(a->consume, CHANNEL, tag, 0) != AMQP_STATUS_OK) {
                free(traceparent);
                rc = broker_fail(&a->base, CV_ERETRY, "rabbitmq: ack of a dead letter failed");
                dead_letter_clear(&d);
                break;
            }
            (*count)++;
        }
        free(traceparent);
        if (out) {
            if (*n == cap) *out = xrealloc(*out, (size_t)(cap = cap ? cap * 2 : 16) * sizeof **out);
            (*out)[(*n)++] = d;
        } else {
            dead_letter_clear(&d);
        }
    }
    amqp_drop_consume(a); /* the unacked ones go back to the dead queue */
    return rc;
}

#define PROBE_CHANNEL 2 /* passive declares: a 404 closes this channel, not the publish one */

/* The messages (and consumers, if not NULL) of queue name, by a passive
 * declare on a channel of its own of the publish connection. Returns 0, or a
 * class; a queue that does not exist counts 0 (RabbitMQ closes that channel:
 * it is acknowledged and opened again next time; a delay queue is declared only
 * at its first retry, so most of them do not exist). */
static int passive_probe(struct amqp_broker *a, const char *name, long *messages, long *consumers, bool *exists) {
    if (exists) *exists = false;
    int rc = amqp_conn_open(a, &a->publish, true);
    if (rc < 0) return rc;
    if (!a->probe_open) {
        amqp_channel_open(a->publish, PROBE_CHANNEL);
        if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->publish), "channel.open")) < 0) {
            amqp_conn_drop(&a->publish);
            return rc;
        }
        a->probe_open = true;
    }
    amqp_queue_declare_ok_t *ok =
        amqp_queue_declare(a->publish, PROBE_CHANNEL, amqp_cstring_bytes(name), 1, 0, 0, 0, amqp_empty_table);
    amqp_rpc_reply_t r = amqp_get_rpc_reply(a->publish);
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD &&
        ((amqp_channel_close_t *)r.reply.decoded)->reply_code == AMQP_NOT_FOUND) {
        amqp_channel_close_ok_t close_ok = {0};
        a->probe_open = false;
        if (amqp_send_method(a->publish, PROBE_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &close_ok) != AMQP_STATUS_OK)
            amqp_conn_drop(&a->publish); /* the connection is broken: the next call opens another */
        *messages = 0;
        if (consumers) *consumers = 0;
        return 0;
    }
    char what[300];
    snprintf(what, sizeof what, "reading queue %s", name);
    if ((rc = amqp_conn_check(a, r, what)) < 0) {
        amqp_conn_drop(&a->publish);
        return rc;
    }
    *messages = ok->message_count;
    if (consumers) *consumers = ok->consumer_count;
    if (exists) *exists = true;
    return 0;
}

static int passive_count(struct amqp_broker *a, const char *name, long *messages, long *consumers) {
    return passive_probe(a, name, messages, consumers, NULL);
}

/* The dead letters of q: the message count of a passive declare (no message moves). */
static int amqp_dead_count(struct broker *b, const struct cfg_queue *q, long *n) {
    char dead[256];
    names_amqp_dead(b->cfg, q->name, dead, sizeof dead);
    return passive_count((struct amqp_broker *)b, dead, n, NULL);
}

/* Ready messages of the queue, its consumers, its dead letters, and the
 * messages of each delay queue the current retry settings use (retry_queue's
 * nominal delays: the base doubled while below the cap, and the cap). */
static int amqp_queue_counts(struct broker *b, const struct cfg_queue *q, struct queue_counts *out) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    const struct cfg *c = b->cfg;
    char name[256], other[300];
    names_amqp_queue(c, q->name, name, sizeof name);
    int rc = passive_count(a, name, &out->waiting, &out->consumers);
    for (int k = 0; rc == 0 && q->lanes >= 2 && k < LANE_CLASSES * q->lanes; k++) { /* waiting: intake + lanes */
        long n;
        names_amqp_lane(c, q->name, k / q->lanes, k % q->lanes, other, sizeof other);
        if ((rc = passive_count(a, other, &n, NULL)) == 0) out->waiting += n;
    }
    names_amqp_dead(c, q->name, other, sizeof other);
    if (rc == 0) rc = passive_count(a, other, &out->dead, NULL);
    for (long nominal = c->retry_base_ms; rc == 0; nominal *= 2) {
        if (nominal > c->retry_max_ms) nominal = c->retry_max_ms;
        long n;
        delay_queue_name(c, q, nominal, other, sizeof other);
        if ((rc = passive_count(a, other, &n, NULL)) == 0) out->retrying += n;
        if (nominal >= c->retry_max_ms) break;
    }
    out->in_flight = -1; /* unacked messages: only the management plugin tells them */
    return rc;
}

/* Each lane's waiting messages by a passive declare; the age of its oldest
 * is not known (-1): AMQP cannot read a message without taking it. */
static int amqp_lane_counts(struct broker *b, const struct cfg_queue *q, struct lane_count *out) {
    int rc = 0;
    for (int k = 0; rc == 0 && k < LANE_CLASSES * q->lanes; k++) {
        char name[256];
        names_amqp_lane(b->cfg, q->name, k / q->lanes, k % q->lanes, name, sizeof name);
        out[k].oldest_age_s = -1;
        rc = passive_count((struct amqp_broker *)b, name, &out[k].depth, NULL);
    }
    return rc;
}

static int amqp_publish_events(struct broker *b, const struct outgoing_event *ev, int n) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    struct amqp_msg *m = calloc((size_t)n, sizeof *m);
    amqp_table_entry_t *h = calloc((size_t)n * 2, sizeof *h); /* each event's traceparent and aggregate headers */
    if (!m || !h) {
        free(m);
        free(h);
        return broker_fail(b, CV_ERETRY, "rabbitmq: out of memory");
    }
    for (int i = 0; i < n; i++) {
        m[i].exchange = a->events_ex;
        m[i].routing_key = ev[i].type;
        m[i].body = ev[i].json;
        m[i].len = strlen(ev[i].json);
        m[i].message_id = ev[i].id;
        m[i].type = ev[i].type;
        /* an event of a traced command carries its traceparent as a header too */
        amqp_table_entry_t *e = &h[2 * i];
        int k = amqp_traceparent_header(e, ev[i].traceparent);
        if (ev[i].aggregate_id && ev[i].aggregate_id[0]) { /* the subscriptions' partition key (section 13) */
            e[k].key = amqp_cstring_bytes("x-conveyor-aggregate");
            e[k].value.kind = AMQP_FIELD_KIND_UTF8;
            e[k].value.value.bytes = amqp_cstring_bytes(ev[i].aggregate_id);
            k++;
        }
        m[i].headers = (amqp_table_t){k, e};
    }
    /* not mandatory: an event nobody subscribes to is not an error */
    int rc = amqp_publish_confirmed(a, m, n, false);
    free(h);
    free(m);
    return rc;
}

static int amqp_subscribe(struct broker *b, const char *pattern) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    int rc = amqp_conn_open(a, &a->consume, false);
    if (rc < 0) return rc;
    amqp_exchange_declare(a->consume, CHANNEL, amqp_cstring_bytes(a->events_ex), amqp_cstring_bytes("topic"),
                          0, 1, 0, 0, amqp_empty_table);
    if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->consume), "declaring the events exchange")) < 0) goto fail;
    amqp_queue_declare_ok_t *ok = amqp_queue_declare(a->consume, CHANNEL, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
    if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->consume), "declaring a subscriber queue")) < 0) goto fail;
    amqp_bytes_t qname = amqp_bytes_malloc_dup(ok->queue);
    amqp_queue_bind(a->consume, CHANNEL, qname, amqp_cstring_bytes(a->events_ex),
                    amqp_cstring_bytes(pattern && *pattern ? pattern : "#"), amqp_empty_table);
    if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->consume), "binding the subscriber queue")) < 0) {
        amqp_bytes_free(qname);
        goto fail;
    }
    amqp_basic_consume(a->consume, CHANNEL, qname, amqp_empty_bytes, 0, 1, 1, amqp_empty_table);
    amqp_bytes_free(qname);
    if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->consume), "basic.consume")) < 0) goto fail;
    return 0;
fail:
    amqp_drop_consume(a);
    return rc;
}

static int amqp_next_event(struct broker *b, char **json, int timeout_ms) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (!a->consume) return broker_fail(b, CV_ERETRY, "rabbitmq: the subscription was lost");
    amqp_envelope_t env;
    int rc = amqp_read_delivery(a, &env, timeout_ms);
    if (rc <= 0) return rc;
    *json = amqp_copy_bytes(env.message.body);
    amqp_destroy_envelope(&env);
    return 1;
}

static const struct broker_ops amqp_ops = { /* no .take: broker.c takes with next, timeout 0 */
    .close = amqp_close_broker,
    .declare = amqp_declare,
    .publish_commands = amqp_publish_commands,
    .consume = amqp_consume,
    .next = amqp_next,
    .ack = amqp_ack,
    .ack_batch = amqp_ack_batch,
    .requeue = amqp_requeue,
    .release = amqp_release,
    .stop_consuming = amqp_stop_consuming,
    .dead_letter = amqp_dead_letter,
    .retry = amqp_retry,
    .maintain = amqp_maintain,
    .dead_walk = amqp_dead_walk,
    .dead_count = amqp_dead_count,
    .queue_counts = amqp_queue_counts,
    .publish_events = amqp_publish_events,
    .subscribe = amqp_subscribe,
    .next_event = amqp_next_event,
    .sort_lanes = amqp_sort_lanes,
    .lane_counts = amqp_lane_counts,
    .subscription_declare = amqp_subscription_declare,
    .subscription_attach = amqp_subscription_attach,
    .subscription_detach = amqp_subscription_detach,
    .subscription_fetch = amqp_subscription_fetch,
    .subscription_keepalive = amqp_subscription_keepalive,
    .subscription_ack = amqp_subscription_ack,
    .subscription_counts = amqp_subscription_counts,
    .subscription_remove = amqp_subscription_remove,
};

/* A laned queue's worker (amqp_consume switches to it): amqp_ops with its
 * lanes' consumers and buffer (amqp_lanes.c), acks one by one, an ordered
 * queue's hand-backs all at once (hand_back_ordered). Made at the first use (a worker is one thread). */
static const struct broker_ops *lane_ops(void) {
    static struct broker_ops ops;
    if (!ops.close) {
        ops = amqp_ops;
        ops.next = amqp_lanes_next;
        ops.take = amqp_lanes_take;
        ops.ack_batch = amqp_ack_each;
        ops.release = amqp_lane_release;
        ops.requeue = amqp_lane_requeue;
        ops.stop_consuming = amqp_lanes_stop;
        ops.lane_oldest = amqp_lanes_oldest;
    }
    return &ops;
}

/* A broker whose publish connection is open: see broker_backend.h. */
struct broker *broker_amqp_open(const struct cfg *cfg, int *cls, char *err, size_t errlen) {
    struct amqp_broker *a = calloc(1, sizeof *a);
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    a->base.ops = &amqp_ops;
    a->base.cfg = cfg;
    snprintf(a->commands_ex, sizeof a->commands_ex, "%s.commands", cfg->prefix);
    snprintf(a->events_ex, sizeof a->events_ex, "%s.events", cfg->prefix);
    if ((*cls = amqp_conn_start(a)) < 0 || (*cls = amqp_conn_open(a, &a->publish, true)) < 0) {
        snprintf(err, errlen, "%s", a->base.err);
        amqp_close_broker(&a->base);
        return NULL;
    }
    return &a->base;
}

int amqp_declare_durable_queue(struct amqp_broker *a, const char *name, bool quorum, bool single_active) {
    return declare_queue(a, name, quorum, single_active);
}

int amqp_passive_probe(struct amqp_broker *a, const char *name, long *messages, long *consumers, bool *exists) {
    return passive_probe(a, name, messages, consumers, exists);
}
