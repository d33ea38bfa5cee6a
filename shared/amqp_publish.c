/* amqp_publish.c - publishing on the RabbitMQ backend's publish connection,
 * which is in confirm mode and only publishes (so confirms never interleave
 * with deliveries): the messages sent, then every confirm awaited within
 * broker.reply_timeout_ms of the last publish (the confirm deadline: a node
 * silent past it is left, amqp_conn_silent). Called by the operations
 * (broker_amqp.c); calls the connections (amqp_conn.c) only. */
#include "amqp_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Sends the n messages m on the open publish channel, counting their delivery
 * tags (a->publish_tag). Returns 0, or CV_ERETRY with the reason in
 * a->base.err and the publish connection dropped (without the close
 * handshake when a bound fired: amqp_conn_silent). */
static int send_all(struct amqp_broker *a, const struct amqp_msg *m, int n, bool mandatory) {
    for (int i = 0; i < n; i++) {
        amqp_basic_properties_t p;
        memset(&p, 0, sizeof p);
        p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
        p.content_type = amqp_cstring_bytes("application/json");
        p.delivery_mode = 2; /* persistent */
        if (m[i].message_id) { p._flags |= AMQP_BASIC_MESSAGE_ID_FLAG; p.message_id = amqp_cstring_bytes(m[i].message_id); }
        if (m[i].type) { p._flags |= AMQP_BASIC_TYPE_FLAG; p.type = amqp_cstring_bytes(m[i].type); }
        if (m[i].headers.num_entries) { p._flags |= AMQP_BASIC_HEADERS_FLAG; p.headers = m[i].headers; }
        if (m[i].expiration) { p._flags |= AMQP_BASIC_EXPIRATION_FLAG; p.expiration = amqp_cstring_bytes(m[i].expiration); }
        amqp_bytes_t body = {m[i].len, (void *)m[i].body};
        int rc = amqp_basic_publish(a->publish, CHANNEL, amqp_cstring_bytes(m[i].exchange),
                                    amqp_cstring_bytes(m[i].routing_key), mandatory, 0, &p, body);
        if (rc == AMQP_STATUS_HEARTBEAT_TIMEOUT || rc == AMQP_STATUS_TIMEOUT) {
            rc = amqp_conn_silent(a, "rabbitmq publish: %s", amqp_error_string2(rc));
            amqp_conn_drop_silent(&a->publish);
            return rc;
        }
        if (rc != AMQP_STATUS_OK) {
            amqp_conn_drop(&a->publish);
            return broker_fail(&a->base, CV_ERETRY, "rabbitmq publish: %s", amqp_error_string2(rc));
        }
        a->publish_tag++;
    }
    return 0;
}

/* What a publish waits for: the confirms of n deliveries, tags first on. */
struct confirms {
    uint64_t first;
    int n, left;              /* the deliveries, and how many are not confirmed yet */
    bool *done;               /* done[t - first]: tag t acked or nacked */
    bool *nacked;             /* nacked[t - first]: tag t nacked (may be NULL) */
    const char *returned;     /* why one came back ("unroutable", "refused (basic.nack)"), or NULL */
    char returned_key[256];   /* the routing key of an unroutable one */
};

/* One frame read while waiting for confirms: an ack or a nack counts the
 * deliveries it covers, a return notes the unroutable one (its message is
 * read and dropped), a close ends the wait. Returns 0 to wait on, or the
 * class that ends the wait with the reason in a->base.err. */
static int confirm_frame(struct amqp_broker *a, struct confirms *w, const amqp_frame_t *f) {
    if (f->frame_type != AMQP_FRAME_METHOD) return 0;
    amqp_method_number_t id = f->payload.method.id;
    if (id == AMQP_BASIC_ACK_METHOD || id == AMQP_BASIC_NACK_METHOD) {
        uint64_t tag;
        bool multiple;
        if (id == AMQP_BASIC_ACK_METHOD) {
            const amqp_basic_ack_t *ack = f->payload.method.decoded;
            tag = ack->delivery_tag; multiple = ack->multiple;
        } else {
            const amqp_basic_nack_t *nack = f->payload.method.decoded;
            tag = nack->delivery_tag; multiple = nack->multiple;
            w->returned = "refused (basic.nack)";
        }
        for (uint64_t t = multiple ? w->first : tag; t <= tag; t++) {
            if (t < w->first || t >= w->first + (uint64_t)w->n || w->done[t - w->first]) continue;
            w->done[t - w->first] = true;
            w->left--;
            if (id == AMQP_BASIC_NACK_METHOD && w->nacked) w->nacked[t - w->first] = true;
        }
    } else if (id == AMQP_BASIC_RETURN_METHOD) {
        const amqp_basic_return_t *ret = f->payload.method.decoded;
        snprintf(w->returned_key, sizeof w->returned_key, "%.*s", (int)ret->routing_key.len,
                 (char *)ret->routing_key.bytes);
        w->returned = "unroutable";
        amqp_message_t msg;
        amqp_rpc_reply_t r = amqp_read_message(a->publish, CHANNEL, &msg, 0);
        if (r.reply_type != AMQP_RESPONSE_NORMAL)
            return broker_fail(&a->base, CV_ERETRY, "rabbitmq: cannot read a returned message");
        amqp_destroy_message(&msg);
    } else if (id == AMQP_CHANNEL_CLOSE_METHOD || id == AMQP_CONNECTION_CLOSE_METHOD) {
        const amqp_channel_close_t *m2 = f->payload.method.decoded; /* same layout for both */
        return broker_fail(&a->base, id == AMQP_CHANNEL_CLOSE_METHOD ? CV_EREFUSED : CV_ERETRY,
                           "rabbitmq closed the channel: %.*s", (int)m2->reply_text.len, (char *)m2->reply_text.bytes);
    }
    return 0;
}

/* Waits for the confirms of the n deliveries from tag first (send_all's).
 * Returns 0 when all came and none came back, else as amqp_publish_confirmed;
 * when some did not come the publish connection is dropped (its confirms
 * would answer the next publish). */
static int await_confirms(struct amqp_broker *a, uint64_t first, int n, bool *nacked) {
    struct confirms w = {first, n, n, calloc((size_t)n, sizeof *w.done), nacked, NULL, ""};
    if (!w.done) {
        amqp_conn_drop(&a->publish); /* its confirms would answer the next publish */
        return broker_fail(&a->base, CV_ERETRY, "rabbitmq: no memory to wait for confirms");
    }
    int rc = 0;
    /* the confirm deadline: every confirm within broker.reply_timeout_ms of the last publish */
    int64_t deadline = clock_mono_ms() + a->base.cfg->broker_reply_timeout_ms;
    bool silent = false;
    broker_note(BROKER_WAITING, 0);
    while (w.left > 0) {
        amqp_frame_t f;
        int64_t wait_ms = deadline - clock_mono_ms();
        if (wait_ms < 0) wait_ms = 0;
        struct timeval tv = {wait_ms / 1000, (wait_ms % 1000) * 1000};
        amqp_maybe_release_buffers(a->publish);
        rc = amqp_simple_wait_frame_noblock(a->publish, &f, &tv);
        if (rc == AMQP_STATUS_TIMEOUT || rc == AMQP_STATUS_HEARTBEAT_TIMEOUT) {
            rc = amqp_conn_silent(a, "rabbitmq %s:%d: %d of %d confirms not in %d ms (%s)", a->info.host, a->info.port,
                                  w.left, n, a->base.cfg->broker_reply_timeout_ms, amqp_error_string2(rc));
            silent = true;
            break;
        }
        if (rc != AMQP_STATUS_OK) {
            rc = broker_fail(&a->base, CV_ERETRY, "rabbitmq waiting for confirms: %s", amqp_error_string2(rc));
            break;
        }
        if ((rc = confirm_frame(a, &w, &f)) < 0) break;
    }
    free(w.done);
    if (w.left > 0) {
        if (silent) amqp_conn_drop_silent(&a->publish);
        else amqp_conn_drop(&a->publish);
        return rc < 0 ? rc : CV_ERETRY;
    }
    broker_note(BROKER_ANSWERED, 0);
    a->publish_heard_ms = clock_mono_ms();
    if (w.returned) {
        if (w.returned_key[0])
            return broker_fail(&a->base, CV_EREFUSED, "rabbitmq returned the message: no queue is bound for '%s'",
                               w.returned_key);
        return broker_fail(&a->base, CV_ERETRY, "rabbitmq %s the message: not taken now", w.returned);
    }
    return 0;
}

/* Publishes msgs and waits for the broker to confirm every one. Returns 0,
 * CV_EREFUSED when one was unroutable (no queue bound: it would be again),
 * CV_ERETRY when one was nacked (the broker could not take it now, e.g. a
 * quorum queue without a leader: send it again) or the connection failed (the
 * publish connection is then dropped). */
int amqp_publish_confirmed(struct amqp_broker *a, const struct amqp_msg *m, int n, bool mandatory) {
    return amqp_publish_confirmed_each(a, m, n, mandatory, NULL);
}

int amqp_publish_confirmed_each(struct amqp_broker *a, const struct amqp_msg *m, int n, bool mandatory,
                                bool *nacked) {
    if (n <= 0) return 0; /* nothing to confirm; and gcc then sees a sane size for calloc below */
    int rc = amqp_conn_open(a, &a->publish, true);
    if (rc < 0) return rc;
    uint64_t first = a->publish_tag + 1;
    if ((rc = send_all(a, m, n, mandatory)) < 0) return rc;
    return await_confirms(a, first, n, nacked);
}
