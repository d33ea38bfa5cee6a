/* amqp_lanes.c - a laned queue's worker on RabbitMQ (docs/contract.md,
 * "Lanes"): one basic.consume per lane queue it serves (the lanes i with
 * i % workers == its index, of every class) on its one consume channel, each
 * with a small prefetch of its own, and a local buffer per (class, lane) that
 * the deliveries go into, keyed by the consumer tag. A take hands out of the
 * buffer by the classes' order for that take (lane_take_order: high first,
 * with the guard against starvation) and round-robin across the lanes of a
 * class, one per lane per round: a flooding key fills one lane, the others
 * interleave. The buffer hands deliveries out of their tag order, so they are
 * acked one by one (broker_amqp.c's lane table), never by a multiple ack.
 * Called by the operations (broker_amqp.c); calls amqp_delivery.c and
 * amqp_conn.c.
 */
#include "amqp_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DRAIN_MAX 4096 /* deliveries read into the buffer at most in one go without waiting */

/* The deliveries of one lane, oldest first. */
struct lane_fifo {
    struct delivery *v;
    int head, n, cap;
};

struct amqp_lanes {
    const struct cfg_queue *q;
    int nserved;                                   /* lanes of each class this worker consumes */
    int served[LANES_MAX];                         /* their numbers */
    struct lane_fifo fifo[LANE_CLASSES][LANES_MAX]; /* by class, and position in served */
    int rr[LANE_CLASSES];                          /* a class's next position in the round */
    int buffered;                                  /* deliveries in all fifos */
    unsigned long takes;                           /* hand-outs so far: lane_take_order's n */
    int prefetch;                                  /* per consumer */
    bool started;                                  /* the consumers run on consume connection number gen */
    uint64_t gen;
};

int amqp_lanes_consume(struct amqp_broker *a, const struct cfg_queue *q, int worker_index) {
    amqp_lanes_free(a->lanes);
    struct amqp_lanes *l = xcalloc(1, sizeof *l);
    l->q = q;
    for (int i = 0; i < q->lanes; i++)
        if (worker_index < 0 || q->workers < 1 || i % q->workers == worker_index) l->served[l->nserved++] = i;
    /* what the worker holds stays about its prefetch per class */
    int want = q->prefetch > q->batch_size ? q->prefetch : q->batch_size;
    l->prefetch = l->nserved ? (want + l->nserved - 1) / l->nserved : 1;
    if (l->prefetch < 1) l->prefetch = 1;
    if (l->prefetch > 65535) l->prefetch = 65535;
    a->lanes = l;
    return 0;
}

/* Empties the buffer: its deliveries' tags died with their connection (RabbitMQ has them back). */
static void lanes_clear(struct amqp_lanes *l) {
    for (int c = 0; c < LANE_CLASSES; c++)
        for (int p = 0; p < l->nserved; p++) {
            struct lane_fifo *f = &l->fifo[c][p];
            for (int k = 0; k < f->n; k++) delivery_free(&f->v[(f->head + k) % f->cap]);
            f->head = f->n = 0;
        }
    l->buffered = 0;
}

void amqp_lanes_free(struct amqp_lanes *l) {
    if (!l) return;
    lanes_clear(l);
    for (int c = 0; c < LANE_CLASSES; c++)
        for (int p = 0; p < LANES_MAX; p++) free(l->fifo[c][p].v);
    free(l);
}

static void fifo_push(struct lane_fifo *f, const struct delivery *d) {
    if (f->n == f->cap) {
        int cap = f->cap ? f->cap * 2 : 8;
        struct delivery *v = xmalloc((size_t)cap * sizeof *v);
        for (int k = 0; k < f->n; k++) v[k] = f->v[(f->head + k) % f->cap];
        free(f->v);
        f->v = v, f->cap = cap, f->head = 0;
    }
    f->v[(f->head + f->n++) % f->cap] = *d;
}

/* The consumer tag of the lane at position p of class c (ours: basic.consume names it). */
static void lane_tag(int c, int p, char *out, size_t n) { snprintf(out, n, "cv.lane.%d.%d", c, p); }

/* The consume connection with a consumer on every lane served, opened (and
 * the buffer emptied) unless it runs. Returns 0 or a class (the connection is
 * then dropped). */
static int lanes_start(struct amqp_broker *a) {
    struct amqp_lanes *l = a->lanes;
    if (a->consume && l->started && l->gen == a->consume_gen) return 0;
    lanes_clear(l);
    l->started = false;
    int rc = amqp_consume_open(a, l->prefetch); /* per consumer: each lane's consumer may hold this many */
    for (int c = 0; c < LANE_CLASSES && rc == 0; c++)
        for (int p = 0; p < l->nserved && rc == 0; p++) {
            char name[256], tag[32];
            names_amqp_lane(a->base.cfg, l->q->name, c, l->served[p], name, sizeof name);
            lane_tag(c, p, tag, sizeof tag);
            rc = amqp_consume_queue(a, name, tag, NULL, 0);
        }
    if (rc < 0) return rc;
    l->started = true;
    l->gen = a->consume_gen;
    return 0;
}

/* Reads one delivery (waiting up to timeout_ms) into its lane's buffer.
 * Returns 1, 0 on timeout, or a class (the connection dropped, the buffer emptied). */
static int lanes_pull(struct amqp_broker *a, int timeout_ms) {
    struct amqp_lanes *l = a->lanes;
    amqp_envelope_t env;
    int rc = amqp_read_delivery(a, &env, timeout_ms);
    if (rc < 0) lanes_clear(l);
    if (rc <= 0) return rc;
    int c = -1, p = -1;
    char tag[64];
    snprintf(tag, sizeof tag, "%.*s", (int)env.consumer_tag.len, (const char *)env.consumer_tag.bytes);
    if (sscanf(tag, "cv.lane.%d.%d", &c, &p) != 2 || c < 0 || c >= LANE_CLASSES || p < 0 || p >= l->nserved) {
        /* not one of ours: back to its queue (a requeue keeps its place) */
        log_warn("rabbitmq: a delivery for an unknown consumer %s; handed back", tag);
        (void)amqp_basic_reject(a->consume, CHANNEL, env.delivery_tag, 1);
        amqp_destroy_envelope(&env);
        return 1;
    }
    struct delivery d;
    amqp_delivery_fill(&env, &d);
    /* its createdAt, as the sorter read it: what the lane's oldest age is told by (amqp_lanes_oldest) */
    amqp_basic_properties_t *props = &env.message.properties;
    const amqp_table_entry_t *at = (props->_flags & AMQP_BASIC_HEADERS_FLAG)
                                       ? amqp_find_header(&props->headers, "x-conveyor-created-ms")
                                       : NULL;
    if (at && at->value.kind == AMQP_FIELD_KIND_I64 && at->value.value.i64 > 0) {
        d.created_ms = at->value.value.i64;
        d.lane = c * l->q->lanes + l->served[p];
    }
    amqp_destroy_envelope(&env);
    fifo_push(&l->fifo[c][p], &d);
    l->buffered++;
    return 1;
}

/* Reads into the buffer what has arrived, without waiting. Returns 0 or a class. */
static int lanes_drain(struct amqp_broker *a) {
    int rc = 0;
    for (int k = 0; k < DRAIN_MAX && (rc = lanes_pull(a, 0)) > 0; k++) {}
    return rc < 0 ? rc : 0;
}

/* The next delivery of class c, round-robin across its lanes, into *d:
 * true, or false when the class has none buffered. */
static bool pop_class(struct amqp_lanes *l, int c, struct delivery *d) {
    for (int k = 0; k < l->nserved; k++) {
        int p = (l->rr[c] + k) % l->nserved;
        struct lane_fifo *f = &l->fifo[c][p];
        if (!f->n) continue;
        *d = f->v[f->head];
        f->head = (f->head + 1) % f->cap;
        f->n--;
        l->buffered--;
        l->rr[c] = (p + 1) % l->nserved;
        return true;
    }
    return false;
}

/* Up to max buffered deliveries into d, by the classes' order of this hand-out. Returns how many. */
static int hand_out(struct amqp_lanes *l, struct delivery *d, int max) {
    int order[LANE_CLASSES], n = 0;
    lane_take_order(l->takes++, order);
    for (int k = 0; k < LANE_CLASSES; k++)
        while (n < max && pop_class(l, order[k], &d[n])) n++;
    return n;
}

int amqp_lanes_take(struct broker *b, struct delivery *d, int max) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    int rc = lanes_start(a);
    if (rc == 0) rc = lanes_drain(a);
    if (rc < 0) return rc;
    return a->lanes->buffered ? hand_out(a->lanes, d, max) : 0;
}

int amqp_lanes_next(struct broker *b, struct delivery *d, int timeout_ms) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    memset(d, 0, sizeof *d);
    int rc = lanes_start(a);
    if (rc == 0) rc = lanes_drain(a);
    if (rc < 0) return rc;
    if (!a->lanes->buffered) {
        /* a worker that serves no lane (more workers than lanes) waits as an idle one */
        if ((rc = lanes_pull(a, timeout_ms)) <= 0) return rc;
        if ((rc = lanes_drain(a)) < 0) return rc; /* what came with it: a high one goes first */
    }
    return hand_out(a->lanes, d, 1);
}

void amqp_lanes_oldest(struct broker *b, int64_t *out) {
    const struct amqp_lanes *l = ((struct amqp_broker *)b)->lanes;
    for (int c = 0; l && c < LANE_CLASSES; c++)
        for (int p = 0; p < l->nserved; p++) {
            const struct lane_fifo *f = &l->fifo[c][p];
            for (int k = 0; k < f->n; k++) {
                const struct delivery *d = &f->v[(f->head + k) % f->cap];
                if (d->created_ms > 0 && (!out[d->lane] || d->created_ms < out[d->lane])) out[d->lane] = d->created_ms;
            }
        }
}

/* basic.cancel of every lane consumer; what arrived before the cancels were
 * answered (librabbitmq keeps those frames) goes into the buffer, and up to
 * max of the buffer is handed over. What is left beyond max stays unacked
 * and comes back when the connection closes. An ordered queue's worker drops
 * its consume connection instead and hands over nothing: RabbitMQ returns
 * all it held to the head of each lane in the lane's order, before a standby
 * consumer of the lane (another pool's) is given anything of it; a cancel
 * would let the standby take the lane's later commands while this worker
 * still holds earlier ones. */
int amqp_lanes_stop(struct broker *b, struct delivery *d, int max) {
    struct amqp_broker *a = (struct amqp_broker *)b;
    struct amqp_lanes *l = a->lanes;
    if (l->q->ordered) amqp_drop_consume(a);
    if (!a->consume || !l->started || l->gen != a->consume_gen) {
        lanes_clear(l); /* no channel: RabbitMQ has them back already */
        return 0;
    }
    int rc = 0;
    for (int c = 0; c < LANE_CLASSES && rc == 0; c++)
        for (int p = 0; p < l->nserved && rc == 0; p++) {
            char tag[32];
            lane_tag(c, p, tag, sizeof tag);
            amqp_basic_cancel(a->consume, CHANNEL, amqp_cstring_bytes(tag));
            rc = amqp_conn_check(a, amqp_get_rpc_reply(a->consume), "basic.cancel of a lane");
        }
    if (rc < 0) {
        amqp_drop_consume(a);
        lanes_clear(l);
        return rc;
    }
    l->started = false; /* a next would start the consumers again */
    if ((rc = lanes_drain(a)) < 0) return rc;
    int n = 0;
    while (n < max && l->buffered) n += hand_out(l, &d[n], max - n);
    return n;
}
