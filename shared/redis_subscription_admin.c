/* redis_subscription_admin.c - a durable subscription's counts and its
 * removal on Redis (docs/contract.md section 13): partition i of subscription
 * NAME is the consumer group sub:NAME:i on the events stream (r->events_key).
 *
 * Counts, per group (XINFO GROUPS, one round trip for all of them):
 *   - its unsettled entries: pending + the entries after its last-delivered-id.
 *     The latter is the group's `lag` while that is known and no entry it had
 *     not read was trimmed; when the stream's first entry is past the group's
 *     last-delivered-id, every entry of the stream is after it (XLEN); when
 *     `lag` is nil they are counted with XRANGE, 1,000 a round trip, up to
 *     COUNT_CAP (then the figure is "at least"), once per last-delivered-id in
 *     a call. Redis 7.0 says nil whenever it does not know how many entries the
 *     group read (`entries-read`): a group created at `$` on a stream that grew
 *     since, until it reads the stream's newest entry; or entries deleted
 *     with XDEL after its position.
 *   - a gap: entries it had not read are gone (the stream trimmed past them:
 *     its lag is more than what the stream still holds after its
 *     last-delivered-id, which can be told while its `entries-read` is known,
 *     as it is for a group that reads; or deleted: XINFO STREAM's
 *     max-deleted-entry-id is after its last-delivered-id).
 *   - the oldest unsettled entry: its oldest pending one (XPENDING's summary)
 *     and the first entry after its last-delivered-id; age = Redis's TIME
 *     minus the entry id's milliseconds.
 * The subscription's lag is the largest group's, its oldest age the oldest of
 * all, its gap any group's. A group (or the stream) that does not exist counts 0.
 */
#include "redis_internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define COUNT_CAP 100000L /* entries counted one by one (XRANGE) at most per group */

/* A stream entry id "ms-seq" into *ms and *seq: true, or false when it is not one. */
static bool parse_id(const char *s, uint64_t *ms, uint64_t *seq) {
    char *end;
    if (!s || !*s) return false;
    *ms = strtoull(s, &end, 10);
    *seq = 0;
    if (*end == '-') *seq = strtoull(end + 1, &end, 10);
    return *end == '\0';
}

/* <0, 0, >0 as id a is before, equal to, after id b (unparsable ids are 0-0). */
static int id_cmp(const char *a, const char *b) {
    uint64_t am = 0, as = 0, bm = 0, bs = 0;
    parse_id(a, &am, &as);
    parse_id(b, &bm, &bs);
    if (am != bm) return am < bm ? -1 : 1;
    return as == bs ? 0 : as < bs ? -1 : 1;
}

/* The value of field key of a flat key/value reply (RESP2), or NULL. */
static const redisReply *field(const redisReply *m, const char *key) {
    if (!m || m->type != REDIS_REPLY_ARRAY) return NULL;
    for (size_t k = 0; k + 1 < m->elements; k += 2)
        if (m->element[k]->type == REDIS_REPLY_STRING && strcmp(m->element[k]->str, key) == 0) return m->element[k + 1];
    return NULL;
}

/* An integer field, or dflt when absent or nil. */
static long long int_field(const redisReply *m, const char *key, long long dflt) {
    const redisReply *v = field(m, key);
    if (v && v->type == REDIS_REPLY_INTEGER) return v->integer;
    if (v && v->type == REDIS_REPLY_STRING) return strtoll(v->str, NULL, 10);
    return dflt;
}

/* A string field copied into out (n bytes; "" when absent). */
static void str_field(const redisReply *m, const char *key, char *out, size_t n) {
    const redisReply *v = field(m, key);
    snprintf(out, n, "%s", v && (v->type == REDIS_REPLY_STRING || v->type == REDIS_REPLY_STATUS) ? v->str : "");
}

/* The first entry id of an XRANGE reply into out ("" when empty). */
static void first_entry_id(const redisReply *rep, char *out, size_t n) {
    out[0] = '\0';
    if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements > 0 && rep->element[0]->type == REDIS_REPLY_ARRAY &&
        rep->element[0]->elements > 0 && rep->element[0]->element[0]->type == REDIS_REPLY_STRING)
        snprintf(out, n, "%s", rep->element[0]->element[0]->str);
}

/* The entries of the stream after id `after` into *n, counted with XRANGE up
 * to COUNT_CAP. Returns 0 or a class (the reason in r->base.err). */
static int count_after(struct redis_broker *r, const char *after, long *n) {
    char from[80];
    snprintf(from, sizeof from, "(%s", after);
    *n = 0;
    while (*n < COUNT_CAP) {
        redisReply *rep = redis_conn_cmd(r, "XRANGE %s %s + COUNT 1000", r->events_key, from);
        if (!rep) return redis_conn_last_error(r);
        size_t got = rep->type == REDIS_REPLY_ARRAY ? rep->elements : 0;
        *n += (long)got;
        if (got > 0 && rep->element[got - 1]->type == REDIS_REPLY_ARRAY && rep->element[got - 1]->elements > 0)
            snprintf(from, sizeof from, "(%s", rep->element[got - 1]->element[0]->str);
        freeReplyObject(rep);
        if (got < 1000) break;
    }
    return 0;
}

/* The age in seconds (at Redis's time now_ms) of entry id (0 for "" or no id). */
static double age_of(const char *id, uint64_t now_ms) {
    uint64_t ms, seq;
    if (!parse_id(id, &ms, &seq)) return 0;
    return now_ms > ms ? (double)(now_ms - ms) / 1000.0 : 0;
}

/* What count_after found for a last-delivered-id, within one count. */
struct counted_after {
    char after[64];
    long n;
};

/* Counts group `group` (its XINFO GROUPS entry g) into *out (lag, oldest,
 * gap: merged with what is there). stream: XINFO STREAM's reply; seen (ncounted
 * entries, room for SUBSCRIPTION_PARTITIONS_MAX) what count_after found in this
 * count. Returns 0 or a class. */
static int count_group(struct redis_broker *r, const char *group, const redisReply *g, const redisReply *stream,
                       uint64_t now_ms, struct counted_after *seen, int *nseen, struct subscription_counts *out) {
    char last[64], first[64], max_deleted[64];
    str_field(g, "last-delivered-id", last, sizeof last);
    long long pending = int_field(g, "pending", 0), lag = int_field(g, "lag", -1); /* -1: nil */
    long long length = int_field(stream, "length", 0);
    const redisReply *fe = field(stream, "first-entry");
    first[0] = '\0';
    if (fe && fe->type == REDIS_REPLY_ARRAY && fe->elements > 0 && fe->element[0]->type == REDIS_REPLY_STRING)
        snprintf(first, sizeof first, "%s", fe->element[0]->str);
    str_field(stream, "max-deleted-entry-id", max_deleted, sizeof max_deleted);
    long unread;
    bool gap = false;
    if (length <= 0) {
        unread = 0;
        gap = lag > 0;
    } else if (id_cmp(first, last) > 0) { /* the whole stream is after it */
        unread = (long)length;
        gap = lag > length; /* trimmed past entries it had not read */
    } else if (lag >= 0) {
        /* a group that has read the stream's last entry has nothing unread, whatever
         * its entries-read (after a gap Redis counts the entries trimmed away as
         * unread until the subscription sets it right: redis_subscription.c) */
        char generated[64];
        str_field(stream, "last-generated-id", generated, sizeof generated);
        unread = *generated && id_cmp(last, generated) >= 0 ? 0 : (long)lag;
    } else { /* nil: not known to Redis; counted (once per position) */
        int k = 0;
        while (k < *nseen && strcmp(seen[k].after, last) != 0) k++;
        if (k == *nseen) {
            int rc = count_after(r, last, &seen[k].n);
            if (rc < 0) return rc;
            snprintf(seen[k].after, sizeof seen[k].after, "%s", last);
            (*nseen)++;
        }
        unread = seen[k].n;
    }
    if (*max_deleted && id_cmp(max_deleted, last) > 0) gap = true;
    long total = unread + (pending > 0 ? (long)pending : 0);
    if (total > out->lag) out->lag = total;
    if (gap) out->gap = true;
    /* the oldest unsettled: its oldest pending entry, and its first unread one */
    char oldest[64] = "";
    if (pending > 0) {
        redisReply *p = redis_conn_cmd(r, "XPENDING %s %s", r->events_key, group);
        if (!p) return redis_conn_last_error(r);
        if (p->type == REDIS_REPLY_ARRAY && p->elements >= 2 && p->element[1]->type == REDIS_REPLY_STRING)
            snprintf(oldest, sizeof oldest, "%s", p->element[1]->str);
        freeReplyObject(p);
    }
    if (unread > 0) {
        redisReply *x = redis_conn_cmd(r, "XRANGE %s (%s + COUNT 1", r->events_key, last);
        if (!x) return redis_conn_last_error(r);
        char next[64];
        first_entry_id(x, next, sizeof next);
        freeReplyObject(x);
        if (*next && (!*oldest || id_cmp(next, oldest) < 0)) snprintf(oldest, sizeof oldest, "%s", next);
    }
    double age = age_of(oldest, now_ms);
    if (age > out->oldest_age_s) out->oldest_age_s = age;
    return 0;
}

/* Whether the events stream exists: 1, 0, or a class. */
static int stream_exists(struct redis_broker *r) {
    redisReply *rep = redis_conn_cmd(r, "EXISTS %s", r->events_key);
    if (!rep) return redis_conn_last_error(r);
    int yes = rep->type == REDIS_REPLY_INTEGER && rep->integer > 0;
    freeReplyObject(rep);
    return yes;
}

/* core.h broker_subscription_counts on Redis: see the top of this file.
 * Returns 0 with *out filled (consumers -1), or a class with the reason in
 * b->err (*out then partly filled). */
int redis_subscription_counts(struct broker *b, const struct subscription_spec *s, struct subscription_counts *out) {
    struct redis_broker *r = (struct redis_broker *)b;
    *out = (struct subscription_counts){.lag = 0, .oldest_age_s = 0, .consumers = -1, .gap = false};
    int rc = redis_conn_ready(r);
    if (rc < 0) return rc;
    if ((rc = stream_exists(r)) <= 0) return rc; /* no stream: nothing to count */
    rc = 0;
    redisReply *t = redis_conn_cmd(r, "TIME");
    if (!t) return redis_conn_last_error(r);
    uint64_t now_ms = 0;
    if (t->type == REDIS_REPLY_ARRAY && t->elements == 2)
        now_ms = strtoull(t->element[0]->str, NULL, 10) * 1000 + strtoull(t->element[1]->str, NULL, 10) / 1000;
    freeReplyObject(t);
    redisReply *st = redis_conn_cmd(r, "XINFO STREAM %s", r->events_key);
    if (!st) return redis_conn_last_error(r);
    redisReply *gs = redis_conn_cmd(r, "XINFO GROUPS %s", r->events_key);
    if (!gs) {
        freeReplyObject(st);
        return redis_conn_last_error(r);
    }
    struct counted_after seen[SUBSCRIPTION_PARTITIONS_MAX];
    int nseen = 0;
    for (int i = 0; rc == 0 && i < s->partitions && i < SUBSCRIPTION_PARTITIONS_MAX; i++) {
        char group[128];
        names_redis_subscription_group(s->name, i, group, sizeof group);
        for (size_t k = 0; gs->type == REDIS_REPLY_ARRAY && k < gs->elements; k++) {
            const redisReply *name = field(gs->element[k], "name");
            if (name && name->type == REDIS_REPLY_STRING && strcmp(name->str, group) == 0) {
                rc = count_group(r, group, gs->element[k], st, now_ms, seen, &nseen, out);
                break;
            }
        }
    }
    freeReplyObject(gs);
    freeReplyObject(st);
    return rc;
}

/* core.h broker_subscription_remove on Redis: XGROUP DESTROY of each
 * partition's group (one that does not exist is fine; with the group go its
 * pending entries, the stream's entries stay). Returns 0 or a class with the
 * reason in b->err (the groups before the failure are gone). */
int redis_subscription_remove(struct broker *b, const struct subscription_spec *s) {
    struct redis_broker *r = (struct redis_broker *)b;
    int rc = redis_conn_ready(r);
    if (rc < 0) return rc;
    if ((rc = stream_exists(r)) <= 0) return rc; /* no stream: no group */
    for (int i = 0; i < s->partitions; i++) {
        char group[128];
        names_redis_subscription_group(s->name, i, group, sizeof group);
        redisReply *rep = redis_conn_cmd(r, "XGROUP DESTROY %s %s", r->events_key, group);
        if (!rep) return redis_conn_last_error(r);
        freeReplyObject(rep);
    }
    return 0;
}
