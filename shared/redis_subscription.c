/* redis_subscription.c - a durable subscription's partitions on Redis
 * (docs/contract.md section 13): one consumer group per partition on the
 * events stream, each read by its one consumer "<name>:<i>", so whoever owns
 * partition i reads the pending entries of the owner before it first
 * (XREADGROUP from 0), in order, then new ones (">"). Every group reads every
 * entry: an entry of another partition (crc32 of its aggregateId,
 * subscription_partition.c) or of a type no pattern matches is acknowledged
 * at once. The groups of one subscription are created at the same id, so
 * they start at the same entry (redis_script_subscription_groups). Called by the operations (broker_redis.c's
 * table); calls redis_conn.c. */
#include "redis_internal.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define IDLE_POLL_MS 50 /* the pause between two reads that found nothing (groups cannot be blocked on together) */
#define ACK_BATCH 64    /* acks held at most before they are sent (one XACK per group) */
#define ACK_HOLD_MS 100 /* nor held longer than this when the next ack or fetch comes */

struct redis_sub {
    const struct subscription_spec *spec; /* borrowed from attach */
    bool attached[SUBSCRIPTION_PARTITIONS_MAX];
    char cursor[SUBSCRIPTION_PARTITIONS_MAX][48]; /* the next read: after this pending entry, or ">" */
    int count;                                    /* entries a read asks for per partition */
    int next;                                     /* the partition read first next time (round robin) */
    bool gap_said;
    int64_t resync_at[SUBSCRIPTION_PARTITIONS_MAX]; /* when a caught-up group's entries-read is set right next */
    /* acks held, sent together: a reply per XACK costs a disk write with appendfsync always */
    struct held_ack_id {
        int partition;
        char entry[48];
    } acks[ACK_BATCH];
    int nacks;
    int64_t acks_since; /* monotonic ms of the oldest held */
};

static int ack_ids(struct redis_broker *r, const char *g, const char **ids, int n);

/* Sends the acks held (one XACK per partition's group). Returns 0 or a class
 * (they are dropped either way: what they acked comes again, and is found done). */
static int flush_acks(struct redis_broker *r) {
    struct redis_sub *sub = r->sub;
    if (!sub || !sub->nacks) return 0;
    int rc = 0;
    for (int i = 0; i < SUBSCRIPTION_PARTITIONS_MAX && rc == 0; i++) {
        const char *ids[ACK_BATCH];
        int n = 0;
        for (int k = 0; k < sub->nacks; k++)
            if (sub->acks[k].partition == i) ids[n++] = sub->acks[k].entry;
        if (!n) continue;
        char g[160];
        names_redis_subscription_group(sub->spec->name, i, g, sizeof g);
        if ((rc = redis_conn_ready(r)) == 0) rc = ack_ids(r, g, ids, n);
    }
    sub->nacks = 0;
    return rc;
}

int redis_subscription_declare(struct broker *b, const struct subscription_spec *s) {
    struct redis_broker *r = (struct redis_broker *)b;
    int rc = redis_conn_ready(r);
    if (rc < 0) return rc;
    char prefix[120];
    snprintf(prefix, sizeof prefix, "sub:%s:", s->name); /* names_redis_subscription_group without the number */
    redisReply *rep = redis_conn_cmd(r, "EVAL %s 1 %s %s %d", redis_script_subscription_groups, r->events_key,
                                     prefix, s->partitions);
    if (!rep) return redis_conn_last_error(r);
    freeReplyObject(rep);
    return 0;
}

int redis_subscription_attach(struct broker *b, const struct subscription_spec *s, int partition, int prefetch) {
    struct redis_broker *r = (struct redis_broker *)b;
    if (partition < 0 || partition >= s->partitions) return broker_fail(b, CV_EREFUSED, "no partition %d", partition);
    if (!r->sub) r->sub = xcalloc(1, sizeof *r->sub);
    if (r->sub->spec != s) memset(r->sub, 0, sizeof *r->sub);
    r->sub->spec = s;
    r->sub->count = prefetch < 1 ? 1 : prefetch > 1000 ? 1000 : prefetch;
    if (!r->sub->attached[partition]) snprintf(r->sub->cursor[partition], sizeof r->sub->cursor[partition], "0");
    r->sub->attached[partition] = true;
    return 0;
}

int redis_subscription_detach(struct broker *b, int partition) {
    struct redis_broker *r = (struct redis_broker *)b;
    flush_acks(r); /* before its next owner reads its pending list */
    if (r->sub && partition < 0) memset(r->sub->attached, 0, sizeof r->sub->attached);
    else if (r->sub && partition < SUBSCRIPTION_PARTITIONS_MAX) r->sub->attached[partition] = false;
    return 0;
}

int redis_subscription_keepalive(struct broker *b) {
    /* a Redis connection idle for long is probed before its next command (redis_conn_ready);
     * acks held by a handler that runs long go now */
    return flush_acks((struct redis_broker *)b);
}

/* Whether the entry belongs to partition i of s: its type matches a pattern
 * and its aggregate id hashes to i. The entry's fields type and aggregate
 * (the relay writes both) are read first; the event's JSON is parsed only for
 * an entry written without them (another publisher). */
static bool event_is_ours(const struct subscription_spec *s, int i, const char *type, const char *aggregate,
                          const char *json) {
    cJSON *o = type && aggregate ? NULL : cJSON_Parse(json);
    if (!type) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "type");
        type = cJSON_IsString(t) ? t->valuestring : NULL;
    }
    bool ours = false;
    for (int k = 0; type && k < s->npatterns && !ours; k++) ours = topic_match(s->patterns[k], type);
    if (ours && !aggregate) {
        const cJSON *agg = cJSON_GetObjectItemCaseSensitive(o, "aggregateId");
        aggregate = cJSON_IsString(agg) ? agg->valuestring : "";
    }
    if (ours) ours = subscription_partition_of(aggregate, s->partitions) == i;
    cJSON_Delete(o);
    return ours;
}

/* XACKs the ids (n of them) of group g. Returns 0 or a class. */
static int ack_ids(struct redis_broker *r, const char *g, const char **ids, int n) {
    if (n == 0) return 0;
    const char **argv = xcalloc((size_t)n + 3, sizeof *argv);
    argv[0] = "XACK";
    argv[1] = r->events_key;
    argv[2] = g;
    for (int k = 0; k < n; k++) argv[3 + k] = ids[k];
    redisReply *rep = redis_conn_argv_cmd(r, n + 3, argv, NULL);
    free(argv);
    if (!rep) return redis_conn_last_error(r);
    freeReplyObject(rep);
    return 0;
}

/* Reads partition i once into out (at most max): returns how many, or a class. */
static int read_partition(struct redis_broker *r, int i, struct sub_delivery *out, int max) {
    struct redis_sub *sub = r->sub;
    char g[160], c[160];
    names_redis_subscription_group(sub->spec->name, i, g, sizeof g);
    names_redis_subscription_consumer(sub->spec->name, i, c, sizeof c);
    int count = sub->count < max ? sub->count : max;
    bool pending = strcmp(sub->cursor[i], ">") != 0;
    redisReply *rep = redis_conn_cmd(r, "XREADGROUP GROUP %s %s COUNT %d STREAMS %s %s", g, c, count, r->events_key,
                                     sub->cursor[i]);
    if (!rep) {
        int rc = redis_conn_last_error(r);
        if (rc == CV_EREFUSED && strstr(r->base.err, "NOGROUP"))
            return broker_fail(&r->base, CV_EREFUSED, "redis: the subscription %s has no group %s on %s (removed?)",
                               sub->spec->name, g, r->events_key);
        return rc;
    }
    redisReply *entries = NULL;
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 && rep->element[0]->elements == 2)
        entries = rep->element[0]->element[1];
    int n = 0, nskip = 0;
    size_t ne = entries && entries->type == REDIS_REPLY_ARRAY ? entries->elements : 0;
    const char **skip = xcalloc(ne ? ne : 1, sizeof *skip);
    for (size_t k = 0; k < ne; k++) {
        redisReply *en = entries->element[k];
        const char *id = en->element[0]->str;
        redisReply *fields = en->elements > 1 ? en->element[1] : NULL;
        const char *json = NULL, *type = NULL, *aggregate = NULL;
        for (size_t f = 0; fields && fields->type == REDIS_REPLY_ARRAY && f + 1 < fields->elements; f += 2) {
            const char *key = fields->element[f]->str, *value = fields->element[f + 1]->str;
            if (!key) continue;
            if (strcmp(key, "event") == 0) json = value;
            else if (strcmp(key, "type") == 0) type = value;
            else if (strcmp(key, "aggregate") == 0) aggregate = value;
        }
        if (pending) snprintf(sub->cursor[i], sizeof sub->cursor[i], "%s", id);
        if (!json && pending && !sub->gap_said) { /* a pending entry the stream trimmed away */
            log_warn("subscription %s: partition %d's pending entry %s was trimmed from %s before it was settled "
                     "(a gap: events.stream_maxlen)", sub->spec->name, i, id, r->events_key);
            sub->gap_said = true;
        }
        if (!json || !event_is_ours(sub->spec, i, type, aggregate, json)) {
            skip[nskip++] = id;
            continue;
        }
        struct sub_delivery *d = &out[n++];
        memset(d, 0, sizeof *d);
        d->json = xstrdup(json);
        d->len = strlen(json);
        d->partition = i;
        snprintf(d->entry, sizeof d->entry, "%s", id);
        d->redelivered = pending;
    }
    if (pending && ne == 0) snprintf(sub->cursor[i], sizeof sub->cursor[i], ">"); /* the pending list is read */
    if (!pending && ne == 0 && clock_mono_ms() >= sub->resync_at[i]) {
        /* caught up: every 10 s its entries-read is set to the stream's count, so
         * that after a gap its lag counts no trimmed entry (a no-op otherwise) */
        sub->resync_at[i] = clock_mono_ms() + 10000;
        redisReply *set = redis_conn_cmd(r, "EVAL %s 1 %s %s", redis_script_subscription_resync, r->events_key, g);
        if (set) freeReplyObject(set);
    }
    int rc = ack_ids(r, g, skip, nskip);
    free(skip);
    freeReplyObject(rep);
    if (rc < 0) {
        for (int k = 0; k < n; k++) sub_delivery_free(&out[k]);
        return rc;
    }
    return n;
}

int redis_subscription_fetch(struct broker *b, struct sub_delivery *out, int max, const int *room, int timeout_ms) {
    struct redis_broker *r = (struct redis_broker *)b;
    if (!r->sub) return 0;
    int64_t deadline = clock_mono_ms() + timeout_ms;
    for (;;) {
        int n = 0, rc = redis_conn_ready(r);
        if (rc == 0) rc = flush_acks(r);
        if (rc < 0) return rc;
        for (int k = 0; k < SUBSCRIPTION_PARTITIONS_MAX && n < max; k++) {
            int i = (r->sub->next + k) % SUBSCRIPTION_PARTITIONS_MAX;
            if (!r->sub->attached[i] || (room && room[i] <= 0)) continue;
            int want = max - n;
            if (room && room[i] < want) want = room[i];
            if ((rc = read_partition(r, i, out + n, want)) < 0) {
                for (int j = 0; j < n; j++) sub_delivery_free(&out[j]);
                /* a lost connection: read each partition's pending entries again when it is back */
                for (int j = 0; j < SUBSCRIPTION_PARTITIONS_MAX; j++) snprintf(r->sub->cursor[j], 48, "0");
                return rc;
            }
            n += rc;
        }
        r->sub->next = (r->sub->next + 1) % SUBSCRIPTION_PARTITIONS_MAX;
        int64_t left = deadline - clock_mono_ms();
        if (n > 0 || left <= 0) return n;
        struct timespec ts = {0, (left < IDLE_POLL_MS ? left : IDLE_POLL_MS) * 1000000L};
        nanosleep(&ts, NULL);
    }
}

int redis_subscription_ack(struct broker *b, const struct sub_delivery *d) {
    struct redis_broker *r = (struct redis_broker *)b;
    if (!r->sub || !r->sub->spec) return broker_fail(b, CV_EREFUSED, "redis: no subscription attached");
    struct redis_sub *sub = r->sub;
    if (!sub->nacks) sub->acks_since = clock_mono_ms();
    sub->acks[sub->nacks].partition = d->partition;
    snprintf(sub->acks[sub->nacks].entry, sizeof sub->acks[sub->nacks].entry, "%s", d->entry);
    sub->nacks++;
    if (sub->nacks < ACK_BATCH && clock_mono_ms() - sub->acks_since < ACK_HOLD_MS) return 0;
    return flush_acks(r);
}
