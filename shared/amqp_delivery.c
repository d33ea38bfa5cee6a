/* amqp_delivery.c - the RabbitMQ backend's consume connection, below the
 * operations: reading a delivery (with the bounds on a silent node), a
 * delivery as struct delivery, its headers, acks, and dropping the
 * connection. Called by the operations (broker_amqp.c) and by the lanes
 * (amqp_lanes.c); calls the connections (amqp_conn.c) only.
 */
#include "amqp_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A NUL-terminated malloc'd copy of bytes (an empty body has bytes == NULL);
 * aborts when out of memory (xmalloc): a delivery has no error to return. */
char *amqp_copy_bytes(amqp_bytes_t b) {
    char *s = xmalloc(b.len + 1);
    if (b.len) memcpy(s, b.bytes, b.len);
    s[b.len] = '\0';
    return s;
}

/* Drops the consume connection; its delivery tags, and an ack held for them, go with it. */
void amqp_drop_consume(struct amqp_broker *a) {
    amqp_conn_drop(&a->consume);
    a->consume_gen++;
    a->ack_held = 0;
    a->ack_held_n = 0;
}

int amqp_consume_open(struct amqp_broker *a, int prefetch) {
    int rc = amqp_conn_open(a, &a->consume, false);
    if (rc < 0) return rc;
    amqp_basic_qos(a->consume, CHANNEL, 0, (uint16_t)prefetch, 0);
    if ((rc = amqp_conn_check(a, amqp_get_rpc_reply(a->consume), "basic.qos")) < 0) amqp_drop_consume(a);
    return rc;
}

int amqp_consume_queue(struct amqp_broker *a, const char *name, const char *tag, char *server_tag, size_t n) {
    amqp_basic_consume_ok_t *ok = amqp_basic_consume(a->consume, CHANNEL, amqp_cstring_bytes(name),
                                                     tag ? amqp_cstring_bytes(tag) : amqp_empty_bytes, 0, 0, 0,
                                                     amqp_empty_table);
    char what[300];
    snprintf(what, sizeof what, "basic.consume of %s", name);
    int rc = amqp_conn_check(a, amqp_get_rpc_reply(a->consume), what);
    if (rc < 0) {
        amqp_drop_consume(a);
        return rc;
    }
    if (server_tag)
        snprintf(server_tag, n, "%.*s", ok ? (int)ok->consumer_tag.len : 0, ok ? (const char *)ok->consumer_tag.bytes : "");
    return 0;
}

/* Acks tag (with multiple, every delivery up to it) on the consume channel.
 * Without the channel, or when the ack cannot be sent (the connection is then
 * dropped), RabbitMQ redelivers those messages and the worker finds them done:
 * said in the log, not an error for the caller. */
void amqp_send_ack(struct amqp_broker *a, uint64_t tag, bool multiple) {
    int rc = a->consume ? amqp_basic_ack(a->consume, CHANNEL, tag, multiple) : AMQP_STATUS_CONNECTION_CLOSED;
    if (rc != AMQP_STATUS_OK) {
        log_warn("rabbitmq ack: %s; the message%s will be redelivered and found done",
                 a->consume ? amqp_error_string2(rc) : "the connection was lost", multiple ? "s" : "");
        amqp_drop_consume(a);
    }
}

/* Reads one delivery from the consume connection: 1, 0 on timeout, <0 on error. */
int amqp_read_delivery(struct amqp_broker *a, amqp_envelope_t *env, int timeout_ms) {
    struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
    for (;;) {
        amqp_maybe_release_buffers(a->consume);
        amqp_rpc_reply_t r = amqp_consume_message(a->consume, env, &tv, 0);
        if (r.reply_type == AMQP_RESPONSE_NORMAL) {
            broker_note(BROKER_ANSWERED, 0);
            return 1;
        }
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_TIMEOUT) return 0;
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_HEARTBEAT_TIMEOUT) {
            amqp_conn_silent(a, "rabbitmq %s:%d: no heartbeat while consuming (%s)", a->info.host, a->info.port,
                        amqp_error_string2(r.library_error));
            amqp_conn_drop(&a->consume); /* librabbitmq closed the socket already: no handshake is tried */
            a->consume_gen++;
            a->ack_held = 0;
            a->ack_held_n = 0;
            return CV_ERETRY;
        }
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION && r.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
            amqp_frame_t f;
            if (amqp_simple_wait_frame(a->consume, &f) != AMQP_STATUS_OK) break;
            if (f.frame_type == AMQP_FRAME_METHOD &&
                (f.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ||
                 f.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD ||
                 f.payload.method.id == AMQP_BASIC_CANCEL_METHOD)) {
                amqp_channel_close_t *m = f.payload.method.decoded;
                broker_fail(&a->base, CV_ERETRY, "rabbitmq closed the consumer: %.*s",
                            f.payload.method.id == AMQP_BASIC_CANCEL_METHOD ? 9 : (int)m->reply_text.len,
                            f.payload.method.id == AMQP_BASIC_CANCEL_METHOD ? "cancelled" : (char *)m->reply_text.bytes);
                amqp_drop_consume(a);
                return CV_ERETRY;
            }
            continue;
        }
        break;
    }
    broker_fail(&a->base, CV_ERETRY, "rabbitmq: connection lost while consuming");
    amqp_drop_consume(a);
    return CV_ERETRY;
}

/* The entry named key of a header table (h may be NULL), or NULL. */
amqp_table_entry_t *amqp_find_header(amqp_table_t *h, const char *key) {
    for (int i = 0; h && i < h->num_entries; i++)
        if (h->entries[i].key.len == strlen(key) && memcmp(h->entries[i].key.bytes, key, h->entries[i].key.len) == 0)
            return &h->entries[i];
    return NULL;
}

/* A header as a string (NULL if absent or not a string; the caller frees it); h may be NULL. */
char *amqp_header_str(amqp_table_t *h, const char *key) {
    amqp_table_entry_t *e = amqp_find_header(h, key);
    if (e && (e->value.kind == AMQP_FIELD_KIND_UTF8 || e->value.kind == AMQP_FIELD_KIND_BYTES))
        return amqp_copy_bytes(e->value.value.bytes);
    return NULL;
}

/* Sets *e to the header traceparent = value; returns 1, or 0 when value is NULL. */
int amqp_traceparent_header(amqp_table_entry_t *e, const char *value) {
    if (!value) return 0;
    e->key = amqp_cstring_bytes("traceparent");
    e->value.kind = AMQP_FIELD_KIND_UTF8;
    e->value.value.bytes = amqp_cstring_bytes(value);
    return 1;
}

void amqp_delivery_fill(amqp_envelope_t *env, struct delivery *d) {
    memset(d, 0, sizeof *d);
    d->len = env->message.body.len;
    d->body = amqp_copy_bytes(env->message.body);
    if (env->message.properties._flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
        amqp_bytes_t id = env->message.properties.message_id;
        d->message_id = amqp_copy_bytes(id);
        /* a NUL byte would cut it into another id: make it unusable instead */
        for (size_t i = 0; i < id.len; i++)
            if (!d->message_id[i]) d->message_id[i] = '?';
    }
    d->tag = env->delivery_tag;
    d->redelivered = amqp_envelope_redelivered(env);
    amqp_basic_properties_t *p = &env->message.properties;
    if (p->_flags & AMQP_BASIC_HEADERS_FLAG) d->traceparent = amqp_header_str(&p->headers, "traceparent");
}

bool amqp_envelope_redelivered(amqp_envelope_t *env) {
    /* back after a crash or a requeue (redelivered), or from a delay queue
     * (RabbitMQ's x-death header, added when it dead-letters the message back),
     * or marked by a release or the sorter (x-conveyor-redelivered) */
    amqp_basic_properties_t *p = &env->message.properties;
    return env->redelivered || ((p->_flags & AMQP_BASIC_HEADERS_FLAG) &&
                                (amqp_find_header(&p->headers, "x-death") ||
                                 amqp_find_header(&p->headers, "x-conveyor-redelivered")));
}
