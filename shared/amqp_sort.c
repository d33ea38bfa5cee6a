/* amqp_sort.c - the sorter's step on RabbitMQ (core.h broker_sort_lanes;
 * docs/contract.md, "Lanes"): the intake of a laned queue consumed on the
 * consume connection, each command published with confirms to its class's
 * consistent-hash exchange with its lane key as routing key (lane_route),
 * then the intake acked; its createdAt rides along in the header
 * x-conveyor-created-ms (ms since the epoch) for the lane's oldest age. One sorter is active at a time (workers/lane_sorter.c)
 * and it publishes in delivery order on one channel, so each lane receives
 * its commands in the intake's order. Called by the operations
 * (broker_amqp.c); calls amqp_delivery.c, amqp_publish.c and amqp_conn.c.
 */
#include "amqp_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The consume connection consuming the intake of q, with a prefetch of max,
 * opened unless it runs. Returns 0 or a class (the connection is then dropped). */
static int sort_start(struct amqp_broker *a, const struct cfg_queue *q, int max) {
    if (a->consume && a->sorting && a->sort_gen == a->consume_gen) return 0;
    a->sorting = false;
    char intake[256];
    names_amqp_queue(a->base.cfg, q->name, intake, sizeof intake);
    int rc = amqp_consume_open(a, max > 65535 ? 65535 : max);
    if (rc == 0) rc = amqp_consume_queue(a, intake, NULL, NULL, 0);
    if (rc < 0) return rc;
    a->sorting = true;
    a->sort_gen = a->consume_gen;
    return 0;
}

/* What one command of the intake becomes: the message to its lane, and the
 * strings and headers it borrows (owned here). */
struct sorted {
    amqp_envelope_t env;
    struct lane_route route;
    char *message_id, *type;
    amqp_table_entry_t h[3];
};

/* m (to the lane exchange of its class, names in ex) from s->env. */
static void sorted_msg(struct sorted *s, const struct cfg_queue *q, char ex[LANE_CLASSES][256], struct amqp_msg *m) {
    amqp_basic_properties_t *p = &s->env.message.properties;
    if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) s->message_id = amqp_copy_bytes(p->message_id);
    if (p->_flags & AMQP_BASIC_TYPE_FLAG) s->type = amqp_copy_bytes(p->type);
    lane_route(q, s->env.message.body.bytes, s->env.message.body.len, s->message_id, &s->route);
    int nh = 0;
    amqp_table_entry_t *tp = (p->_flags & AMQP_BASIC_HEADERS_FLAG) ? amqp_find_header(&p->headers, "traceparent")
                                                                  : NULL;
    if (tp) s->h[nh++] = *tp; /* borrows env's bytes */
    if (amqp_envelope_redelivered(&s->env)) { /* its worker still counts the attempt (amqp_delivery_fill) */
        s->h[nh].key = amqp_cstring_bytes("x-conveyor-redelivered");
        s->h[nh].value.kind = AMQP_FIELD_KIND_BOOLEAN;
        s->h[nh++].value.value.boolean = 1;
    }
    if (s->route.created_ms > 0) { /* its lane's oldest age, read by the lane's consumer (amqp_lanes.c) */
        s->h[nh].key = amqp_cstring_bytes("x-conveyor-created-ms");
        s->h[nh].value.kind = AMQP_FIELD_KIND_I64;
        s->h[nh++].value.value.i64 = s->route.created_ms;
    }
    *m = (struct amqp_msg){ex[s->route.cls], s->route.key, s->env.message.body.bytes, s->env.message.body.len,
                           s->message_id, s->type, {nh, s->h}, NULL};
}

int amqp_sort_lanes(struct broker *b, const struct cfg_queue *q, int max, int timeout_ms) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    if (max < 1) return 0;
    int rc = sort_start(a, q, max);
    if (rc < 0) return rc;
    struct sorted *s = xcalloc((size_t)max, sizeof *s);
    struct amqp_msg *m = xcalloc((size_t)max, sizeof *m);
    int n = 0;
    /* the first waited for, then what is already there */
    rc = amqp_read_delivery(a, &s[0].env, timeout_ms);
    if (rc > 0) {
        n = 1;
        while (n < max && (rc = amqp_read_delivery(a, &s[n].env, 0)) > 0) n++;
    }
    if (rc >= 0 && n > 0) {
        char ex[LANE_CLASSES][256];
        for (int c = 0; c < LANE_CLASSES; c++) names_amqp_lanes_exchange(b->cfg, q->name, c, ex[c], sizeof ex[c]);
        for (int i = 0; i < n; i++) sorted_msg(&s[i], q, ex, &m[i]);
        /* mandatory: a lane exchange without its queues refuses it (CV_EREFUSED) */
        rc = amqp_publish_confirmed(a, m, n, true);
        if (rc == 0 && amqp_basic_ack(a->consume, CHANNEL, s[n - 1].env.delivery_tag, 1) != AMQP_STATUS_OK)
            rc = broker_fail(b, CV_ERETRY, "rabbitmq: the sorter's ack of the intake failed");
    }
    /* On a failure nothing is acked: dropping the connection hands every
     * unacked command of the intake back, first in its order; a copy that
     * reached a lane before the failure is then sorted again, and the
     * second copy is applied once by its id (processed_commands). */
    if (rc < 0) amqp_drop_consume(a);
    for (int i = 0; i < n; i++) {
        amqp_destroy_envelope(&s[i].env);
        free(s[i].message_id);
        free(s[i].type);
    }
    free(s);
    free(m);
    return rc < 0 ? rc : n;
}
