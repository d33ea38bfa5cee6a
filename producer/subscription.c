/* subscription.c - durable subscriptions, the C API of conveyor.h
 * (docs/contract.md section 13): the events this process holds, handed out
 * one aggregate at a time in the order they came (a partition's order is its
 * commit order), retries with backoff that hold back only their aggregate,
 * dead letters after max_attempts, the replay from the outbox before the
 * live partitions, and once a second the partitions' balance with the other
 * processes. The broker's side is core.h's broker_subscription_*; the
 * database's is subscription_registry.c.
 *
 * Every event held is in one list in the order it came (a replayed one, a
 * partition's, a retried dead letter), each WAITING, OUT (handed out, not
 * settled) or RETRY (nacked, due again at due_ms). The event handed out next
 * is the first of the list that is the first of its aggregate and WAITING
 * (or RETRY and due): so an aggregate's next event waits until the one before
 * is settled, and others go on. */
#include "conveyor.h"
#include "subscription_internal.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define HOLD_PER_PARTITION 1000 /* events held per partition owned, at most (section 13) */
#define FETCH_MAX 256           /* events read from the broker in one go */
#define PREFETCH 1000           /* RabbitMQ's prefetch per partition (section 13's bound); Redis reads at most this many */
#define RETRY_MAX_MS 60000
#define REPLAY_BATCH 200

enum held_state { H_WAITING, H_OUT, H_RETRY };
enum held_source { SRC_LIVE, SRC_REPLAY, SRC_DEAD };

struct held {
    conveyor_event pub;     /* first: what the caller gets (points into this struct) */
    struct sub_delivery d;  /* the broker's delivery (live); d.json is the event's text for every source */
    char id[ID_LEN + 1];
    char type[160];
    char agg[80];           /* the aggregate key: its aggregateId, or its event id when it has none */
    char agg_id[80];        /* aggregateId as given ("" when none) */
    int64_t occurred_ms;    /* its occurredAt, ms since the epoch (0: none readable) */
    enum held_state state;
    enum held_source src;
    int attempts;           /* hand-outs so far */
    int64_t due_ms;         /* H_RETRY: monotonic ms it may go again */
    struct held *prev, *next;
};

/* A set of aggregate keys for one scan of the list (open addressing), kept
 * between scans: a scan clears only the slots it filled, so it costs what it
 * looked at, not what is held. */
struct agg_set {
    const char **v;
    size_t cap;
    size_t *used; /* the slots filled by this scan */
    size_t nused;
};

struct conveyor_subscription {
    struct cfg cfg;
    char name[80];
    char **patterns;
    int npatterns;
    struct subscription_spec spec;
    enum transport transport;
    struct broker *b;
    struct sub_registry g;
    bool db_up;
    struct sub_row row;
    bool has_replay;                          /* created with a --from other than newest */
    bool attached[SUBSCRIPTION_PARTITIONS_MAX];
    bool want[SUBSCRIPTION_PARTITIONS_MAX];
    int64_t drain_since[SUBSCRIPTION_PARTITIONS_MAX]; /* a partition given up: since when it drains (0: not) */
    int nout[SUBSCRIPTION_PARTITIONS_MAX];    /* OUT events per partition */
    int npart[SUBSCRIPTION_PARTITIONS_MAX];   /* live events held per partition (HOLD_PER_PARTITION at most) */
    struct held *head, *tail;
    int nheld;
    struct agg_set seen;                      /* pick's scratch set */
    int max_attempts, retry_base_ms;
    int64_t next_balance_ms, next_seen_ms, next_gap_ms;
    bool broker_lost;                         /* reattach every owned partition */
    /* the replay */
    int64_t replay_cursor, replay_batch_end;
    int replay_held;
    bool gap_said;
    bool cfg_ok;
    char err[1024];
};

/* ---- the list of events held -------------------------------------------------------------- */

static void held_unlink(conveyor_subscription *s, struct held *h) {
    if (h->prev) h->prev->next = h->next; else s->head = h->next;
    if (h->next) h->next->prev = h->prev; else s->tail = h->prev;
    s->nheld--;
    if (h->src == SRC_LIVE && h->d.partition >= 0) s->npart[h->d.partition]--;
    if (h->state == H_OUT && h->d.partition >= 0) s->nout[h->d.partition]--;
    if (h->src == SRC_REPLAY) s->replay_held--;
}

static void held_free(struct held *h) {
    sub_delivery_free(&h->d);
    free(h);
}

/* A new held event of json (owned: it is taken); NULL when json is not an
 * event (no id): the caller settles it. */
static struct held *held_new(char *json, enum held_source src) {
    cJSON *o = cJSON_Parse(json);
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(o, "type");
    const cJSON *agg = cJSON_GetObjectItemCaseSensitive(o, "aggregateId");
    const cJSON *at = cJSON_GetObjectItemCaseSensitive(o, "occurredAt");
    char idbuf[ID_LEN + 1];
    if (!cJSON_IsString(id) || !id_parse(id->valuestring, idbuf)) {
        cJSON_Delete(o);
        return NULL;
    }
    struct held *h = xcalloc(1, sizeof *h);
    snprintf(h->id, sizeof h->id, "%s", idbuf);
    snprintf(h->type, sizeof h->type, "%s", cJSON_IsString(type) ? type->valuestring : "");
    snprintf(h->agg_id, sizeof h->agg_id, "%s", cJSON_IsString(agg) ? agg->valuestring : "");
    snprintf(h->agg, sizeof h->agg, "%s", h->agg_id[0] ? h->agg_id : h->id);
    if (!cJSON_IsString(at) || !clock_rfc3339_ms(at->valuestring, &h->occurred_ms)) h->occurred_ms = 0;
    cJSON_Delete(o);
    h->d.json = json;
    h->d.len = strlen(json);
    h->d.partition = -1;
    h->src = src;
    return h;
}

static void held_append(conveyor_subscription *s, struct held *h) {
    h->prev = s->tail;
    h->next = NULL;
    if (s->tail) s->tail->next = h; else s->head = h;
    s->tail = h;
    s->nheld++;
    if (h->src == SRC_LIVE && h->d.partition >= 0) s->npart[h->d.partition]++;
    if (h->src == SRC_REPLAY) s->replay_held++;
}

static struct held *held_find(conveyor_subscription *s, const char *id) {
    for (struct held *h = s->head; h; h = h->next)
        if (strcmp(h->id, id) == 0) return h;
    return NULL;
}

/* Drops the held events of partition i that are not out (every partition's
 * when i < 0): they come again from the broker to whoever owns the partition. */
static void drop_waiting(conveyor_subscription *s, int i) {
    for (struct held *h = s->head, *n; h; h = n) {
        n = h->next;
        if (h->src != SRC_LIVE || h->state == H_OUT || (i >= 0 && h->d.partition != i)) continue;
        held_unlink(s, h);
        held_free(h);
    }
}

static uint64_t hash_str(const char *p) {
    uint64_t h = 1469598103934665603ull;
    while (*p) h = (h ^ (unsigned char)*p++) * 1099511628211ull;
    return h;
}

/* Adds key; returns false when it was there already. */
static bool agg_set_add(struct agg_set *a, const char *key) {
    for (size_t k = hash_str(key) & (a->cap - 1);; k = (k + 1) & (a->cap - 1)) {
        if (!a->v[k]) {
            a->v[k] = key;
            a->used[a->nused++] = k;
            return true;
        }
        if (strcmp(a->v[k], key) == 0) return false;
    }
}

/* The next event to hand out, or NULL; *wake_ms gets the earliest due retry
 * (monotonic ms; 0: none). */
static struct held *pick(conveyor_subscription *s, int64_t now, int64_t *wake_ms) {
    *wake_ms = 0;
    if (!s->head) return NULL;
    struct agg_set *seen = &s->seen;
    if (seen->cap < (size_t)s->nheld * 2 + 2) { /* room for every key held, at most half full */
        size_t cap = seen->cap ? seen->cap : 64;
        while (cap < (size_t)s->nheld * 2 + 2) cap *= 2;
        free(seen->v);
        free(seen->used);
        seen->v = xcalloc(cap, sizeof *seen->v);
        seen->used = xcalloc(cap, sizeof *seen->used);
        seen->cap = cap;
    }
    struct held *found = NULL;
    for (struct held *h = s->head; h && !found; h = h->next) {
        if (!agg_set_add(seen, h->agg)) continue; /* an earlier one of its aggregate is held */
        if (h->d.partition >= 0 && s->drain_since[h->d.partition]) continue; /* being given up */
        if (h->state == H_WAITING) found = h;
        else if (h->state == H_RETRY) {
            if (h->due_ms <= now) found = h;
            else if (!*wake_ms || h->due_ms < *wake_ms) *wake_ms = h->due_ms;
        }
    }
    for (size_t k = 0; k < seen->nused; k++) seen->v[seen->used[k]] = NULL;
    seen->nused = 0;
    return found;
}

/* ---- the partitions ------------------------------------------------------------------------ */

static void detach_all(conveyor_subscription *s) {
    if (s->b) broker_subscription_detach(s->b, -1);
    memset(s->attached, 0, sizeof s->attached);
    drop_waiting(s, -1);
}

/* The database was lost: nothing is owned any more. */
static void lose_db(conveyor_subscription *s) {
    snprintf(s->err, sizeof s->err, "Conveyor's database: %s", s->g.err);
    sub_registry_close(&s->g);
    s->db_up = false;
    detach_all(s);
    memset(s->want, 0, sizeof s->want);
    memset(s->drain_since, 0, sizeof s->drain_since);
}

static void lose_broker(conveyor_subscription *s) {
    snprintf(s->err, sizeof s->err, "%s: %s", transport_name(s->transport), broker_error(s->b));
    detach_all(s);
    s->broker_lost = true;
}

/* Once a second: the session, the balance, the drains, attaching what is
 * owned, dead letters asked again. Returns 0 or CONVEYOR_EBROKER. */
static int housekeeping(conveyor_subscription *s, int64_t now) {
    if (now < s->next_balance_ms) return 0;
    s->next_balance_ms = now + 1000;
    if (!s->db_up) {
        if (sub_registry_connect(&s->g, s->cfg.database_url, s->name) < 0) {
            snprintf(s->err, sizeof s->err, "Conveyor's database: %s", s->g.err);
            sub_registry_close(&s->g);
            return CONVEYOR_EBROKER;
        }
        s->db_up = true;
    }
    if (s->row.replaying) { /* another process may have finished it */
        struct sub_row row;
        int found = sub_registry_load(&s->g, &row);
        if (found < 0) return lose_db(s), CONVEYOR_EBROKER;
        if (found) {
            sub_row_free(&s->row);
            s->row = row;
        }
    }
    bool want[SUBSCRIPTION_PARTITIONS_MAX];
    if (sub_registry_balance(&s->g, s->spec.partitions, want) < 0) return lose_db(s), CONVEYOR_EBROKER;
    for (int i = 0; i < s->spec.partitions; i++) {
        if (want[i]) {
            s->drain_since[i] = 0;
            continue;
        }
        if (!s->g.owned[i]) continue;
        /* given up: its events out settle first (a process that hangs loses
         * its session, and the partition, after 60 s idle), then it goes */
        if (!s->drain_since[i]) s->drain_since[i] = now;
        if (s->nout[i] > 0) continue;
        if (s->attached[i]) broker_subscription_detach(s->b, i);
        s->attached[i] = false;
        drop_waiting(s, s->transport == TRANSPORT_RABBITMQ ? -1 : i); /* RabbitMQ gives back every partition's */
        s->drain_since[i] = 0;
        if (sub_registry_release(&s->g, i) < 0) return lose_db(s), CONVEYOR_EBROKER;
    }
    memcpy(s->want, want, sizeof want);
    if (broker_subscription_keepalive(s->b) < 0) lose_broker(s); /* reattached below, or next time */
    if (now >= s->next_seen_ms) {
        s->next_seen_ms = now + 5000;
        if (sub_registry_seen(&s->g) < 0) return lose_db(s), CONVEYOR_EBROKER;
    }
    if (now >= s->next_gap_ms) {
        s->next_gap_ms = now + 60000;
        if (s->transport == TRANSPORT_REDIS && !s->gap_said) {
            struct subscription_counts c;
            if (broker_subscription_counts(s->b, &s->spec, &c) == 0 && c.gap) {
                fprintf(stderr, "conveyor: subscription %s: the events stream was trimmed past entries it had not "
                        "read (a gap: events.stream_maxlen); going on with what remains\n", s->name);
                sub_registry_gap(&s->g, "the stream was trimmed past entries not read yet");
                s->gap_said = true;
            }
        }
    }
    /* dead letters asked to be retried */
    PGresult *r;
    if (sub_registry_claim_retries(&s->g, 10, &r) < 0) return lose_db(s), CONVEYOR_EBROKER;
    for (int k = 0; k < PQntuples(r); k++) {
        if (held_find(s, PQgetvalue(r, k, 0))) continue;
        char *json = xstrdup(PQgetvalue(r, k, 1));
        struct held *h = held_new(json, SRC_DEAD);
        if (h) held_append(s, h);
        else { /* not an event: nothing to retry */
            free(json);
            sub_registry_retry_done(&s->g, PQgetvalue(r, k, 0));
        }
    }
    PQclear(r);
    if (s->row.replaying) return 0; /* the live partitions wait for the replay */
    if (s->broker_lost) { /* reopen what the broker needs (its connections come back by themselves) */
        if (broker_subscription_declare(s->b, &s->spec) < 0) {
            snprintf(s->err, sizeof s->err, "%s: %s", transport_name(s->transport), broker_error(s->b));
            return CONVEYOR_EBROKER;
        }
        s->broker_lost = false;
    }
    for (int i = 0; i < s->spec.partitions; i++) {
        if (!s->want[i] || s->attached[i]) continue;
        if (broker_subscription_attach(s->b, &s->spec, i, PREFETCH) < 0) return lose_broker(s), CONVEYOR_EBROKER;
        s->attached[i] = true;
    }
    return 0;
}

/* ---- the replay ---------------------------------------------------------------------------- */

/* Feeds the replay: the next batch once the one before is settled, its
 * progress, its end. Returns 0 or CONVEYOR_EBROKER. */
static int replay_step(conveyor_subscription *s) {
    if (!s->row.replaying || !s->db_up || s->replay_held > 0) return 0;
    bool had = s->g.replay_locked;
    int locked = sub_registry_replay_lock(&s->g);
    if (locked < 0) return lose_db(s), CONVEYOR_EBROKER;
    if (!locked) return 0; /* another process replays */
    if (!had) { /* taken now: go on from where the process before got */
        struct sub_row row;
        int found = sub_registry_load(&s->g, &row);
        if (found < 0) return lose_db(s), CONVEYOR_EBROKER;
        if (found) {
            if (row.replay_cursor > s->replay_cursor) s->replay_cursor = s->replay_batch_end = row.replay_cursor;
            sub_row_free(&row);
        }
    }
    /* every outbox row up to the replay's end must be committed or gone first */
    int visible = sub_registry_replay_visible(&s->g, &s->row);
    if (visible < 0) return lose_db(s), CONVEYOR_EBROKER;
    if (!visible) return 0;
    if (s->replay_batch_end > s->replay_cursor) { /* the batch out is settled */
        s->replay_cursor = s->replay_batch_end;
        if (sub_registry_replay_progress(&s->g, s->replay_cursor, false) < 0) return lose_db(s), CONVEYOR_EBROKER;
    }
    PGresult *r;
    if (sub_registry_replay_rows(&s->g, &s->row, s->replay_cursor, REPLAY_BATCH, &r) < 0)
        return lose_db(s), CONVEYOR_EBROKER;
    int n = PQntuples(r);
    for (int k = 0; k < n; k++) {
        s->replay_batch_end = strtoll(PQgetvalue(r, k, 0), NULL, 10);
        char *json = xstrdup(PQgetvalue(r, k, 1));
        struct held *h = held_new(json, SRC_REPLAY);
        if (!h) {
            free(json);
            continue;
        }
        bool match = false;
        for (int p = 0; p < s->npatterns && !match; p++) match = topic_match(s->patterns[p], h->type);
        if (!match) {
            held_free(h);
            continue;
        }
        held_append(s, h);
    }
    PQclear(r);
    if (n > 0) return 0;
    int done = sub_registry_replay_complete(&s->g, &s->row, s->replay_cursor);
    if (done < 0) return lose_db(s), CONVEYOR_EBROKER;
    if (done) {
        if (sub_registry_replay_progress(&s->g, s->replay_cursor, true) < 0) return lose_db(s), CONVEYOR_EBROKER;
        s->row.replaying = false;
        s->next_balance_ms = 0; /* attach the partitions now */
    }
    return 0;
}

/* ---- reading the broker -------------------------------------------------------------------- */

/* Whether the live event h was handed out by the replay already (created
 * with --from, and it may be one the outbox had then). 1, 0, or a class. */
static int replayed_already(conveyor_subscription *s, const struct held *h) {
    if (!s->has_replay) return 0;
    bool early = h->occurred_ms <= s->row.created_ms + 5000; /* or none readable */
    return early ? sub_registry_replayed(&s->g, &s->row, h->id) : 0;
}

/* Reads what the broker has (waiting up to timeout_ms) into the list.
 * Returns 0 or CONVEYOR_EBROKER. */
static int fill(conveyor_subscription *s, int timeout_ms) {
    int room[SUBSCRIPTION_PARTITIONS_MAX], any = 0;
    for (int i = 0; i < SUBSCRIPTION_PARTITIONS_MAX; i++) {
        room[i] = s->attached[i] ? HOLD_PER_PARTITION - s->npart[i] : 0;
        any += room[i] > 0;
    }
    if (!any) { /* nothing owned, or every partition holds its most: wait (housekeeping goes on) */
        struct timespec ts = {timeout_ms / 1000, (timeout_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        return 0;
    }
    struct sub_delivery buf[FETCH_MAX];
    int n = broker_subscription_fetch(s->b, buf, FETCH_MAX, room, timeout_ms);
    if (n < 0) {
        lose_broker(s);
        return CONVEYOR_EBROKER;
    }
    for (int k = 0; k < n; k++) {
        struct held *h = held_new(buf[k].json, SRC_LIVE);
        if (!h) { /* not an event: settled at once */
            log_warn("subscription %s: a message that is not an event (no id) was skipped", s->name);
            broker_subscription_ack(s->b, &buf[k]);
            sub_delivery_free(&buf[k]);
            continue;
        }
        h->d = buf[k];
        /* only a redelivery can be held already (a connection lost and back), or a dead
         * letter being retried: a first delivery needs no look through the list */
        struct held *old = buf[k].redelivered ? held_find(s, h->id) : NULL;
        if (old && old->src == SRC_LIVE && old->d.partition == h->d.partition) {
            /* delivered again (a connection lost): the new delivery is the one to
             * ack; the caller may hold the old one's json, which stays */
            old->d.tag = h->d.tag;
            old->d.gen = h->d.gen;
            memcpy(old->d.entry, h->d.entry, sizeof old->d.entry);
            old->d.redelivered = true;
            held_free(h);
            continue;
        }
        int dup = old ? 1 : replayed_already(s, h);
        if (dup < 0) {
            held_free(h);
            for (int j = k + 1; j < n; j++) sub_delivery_free(&buf[j]);
            return lose_db(s), CONVEYOR_EBROKER;
        }
        if (dup) { /* the replay (or a retried dead letter) has it */
            broker_subscription_ack(s->b, &h->d);
            held_free(h);
            continue;
        }
        held_append(s, h);
    }
    return 0;
}

/* ---- the API --------------------------------------------------------------------------------- */

static bool name_valid(const char *name) {
    size_t n = name ? strlen(name) : 0;
    if (n < 1 || n > 64) return false;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
            return false;
    }
    return true;
}

static bool pattern_valid(const char *p) {
    size_t n = strlen(p);
    if (n < 1 || n > 255 || p[0] == '.' || p[n - 1] == '.' || strstr(p, "..")) return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] <= ' ' || p[i] == '"' || p[i] == ',' || p[i] == '{' || p[i] == '}' || p[i] == '\\')
            return false;
    return true;
}

/* Whether the patterns given equal the row's (as sets, in order given). */
static bool same_patterns(const struct sub_row *row, char **p, int n) {
    if (row->npatterns != n) return false;
    for (int i = 0; i < n; i++) {
        bool found = false;
        for (int k = 0; k < n && !found; k++) found = strcmp(row->patterns[k], p[i]) == 0;
        if (!found) return false;
    }
    return true;
}

static conveyor_subscription *open_fail(conveyor_subscription *s, int code, int *out, char *err, size_t errlen) {
    if (out) *out = code;
    snprintf(err, errlen, "%s", s->err);
    conveyor_subscription_close(s);
    return NULL;
}

/* The public code of a class from opening a broker or the database. */
static int open_code(int cls) { return cls == CV_ECONFIG ? CONVEYOR_EINVALID : CONVEYOR_EBROKER; }

conveyor_subscription *conveyor_subscription_open(const char *config_path, const char *name,
                                                  const char *const *patterns,
                                                  const struct conveyor_subscription_options *opts, char *err,
                                                  size_t errlen, int *code) {
    struct conveyor_subscription_options o;
    memset(&o, 0, sizeof o);
    if (opts) memcpy(&o, opts, opts->size && opts->size < sizeof o ? opts->size : sizeof o);
    conveyor_subscription *s = xcalloc(1, sizeof *s);
    if (cfg_load(config_path ? config_path : "queues.conf", &s->cfg, s->err, sizeof s->err) < 0) {
        if (code) *code = CONVEYOR_EINVALID;
        snprintf(err, errlen, "%s", s->err);
        free(s);
        return NULL;
    }
    s->cfg_ok = true;
    if (!name_valid(name)) {
        snprintf(s->err, sizeof s->err, "subscription name '%.80s' is not valid: 1 to 64 of A-Z a-z 0-9 _ -",
                 name ? name : "");
        return open_fail(s, CONVEYOR_EINVALID, code, err, errlen);
    }
    snprintf(s->name, sizeof s->name, "%s", name);
    s->transport = s->cfg.events_transport;
    if (o.transport && !transport_parse(o.transport, &s->transport)) {
        snprintf(s->err, sizeof s->err, "transport '%.40s': must be rabbitmq or redis", o.transport);
        return open_fail(s, CONVEYOR_EINVALID, code, err, errlen);
    }
    const char *from = o.from && *o.from ? o.from : NULL;
    if (from && !sub_from_valid(from)) {
        snprintf(s->err, sizeof s->err,
                 "from '%.80s': must be newest, oldest, an RFC 3339 time (2026-12-01T10:00:00Z) or an event id", from);
        return open_fail(s, CONVEYOR_EINVALID, code, err, errlen);
    }
    if (o.partitions && (o.partitions < 1 || o.partitions > SUBSCRIPTION_PARTITIONS_MAX)) {
        snprintf(s->err, sizeof s->err, "partitions %d: must be 1 to %d", o.partitions, SUBSCRIPTION_PARTITIONS_MAX);
        return open_fail(s, CONVEYOR_EINVALID, code, err, errlen);
    }
    s->max_attempts = o.max_attempts > 0 ? o.max_attempts : 5;
    s->retry_base_ms = o.retry_base_ms > 0 ? o.retry_base_ms : 1000;
    int ngiven = 0;
    while (patterns && patterns[ngiven]) {
        if (!pattern_valid(patterns[ngiven])) {
            snprintf(s->err, sizeof s->err, "pattern '%.80s' is not valid (topic syntax: words split by '.', "
                     "'*' one word, '#' any number)", patterns[ngiven]);
            return open_fail(s, CONVEYOR_EINVALID, code, err, errlen);
        }
        ngiven++;
    }
    int rc = sub_registry_connect(&s->g, s->cfg.database_url, s->name);
    if (rc < 0) {
        snprintf(s->err, sizeof s->err, "Conveyor's database: %s", s->g.err);
        return open_fail(s, open_code(rc), code, err, errlen);
    }
    s->db_up = true;
    int cls = CV_ERETRY;
    s->b = broker_open_class(&s->cfg, s->transport, &cls, s->err, sizeof s->err);
    if (!s->b) return open_fail(s, open_code(cls), code, err, errlen);
    int found = sub_registry_load(&s->g, &s->row);
    bool existed = found > 0;
    if (found < 0) {
        snprintf(s->err, sizeof s->err, "Conveyor's database: %s", s->g.err);
        return open_fail(s, CONVEYOR_EBROKER, code, err, errlen);
    }
    if (!found) { /* a new subscription: the broker's objects, then its row */
        static const char *const all[] = {"#", NULL};
        const char *const *use = ngiven ? patterns : all;
        s->npatterns = ngiven ? ngiven : 1;
        s->patterns = xcalloc((size_t)s->npatterns, sizeof *s->patterns);
        for (int i = 0; i < s->npatterns; i++) s->patterns[i] = xstrdup(use[i]);
        s->spec = (struct subscription_spec){s->name, (const char *const *)s->patterns, s->npatterns,
                                             o.partitions ? o.partitions : 4};
        if ((rc = broker_subscription_declare(s->b, &s->spec)) < 0) {
            snprintf(s->err, sizeof s->err, "%s: %s", transport_name(s->transport), broker_error(s->b));
            return open_fail(s, rc == CV_ERETRY ? CONVEYOR_EBROKER : CONVEYOR_EINVALID, code, err, errlen);
        }
        rc = sub_registry_create(&s->g, transport_name(s->transport), (const char *const *)s->patterns, s->npatterns,
                                 s->spec.partitions, from ? from : "newest");
        if (rc < 0) {
            snprintf(s->err, sizeof s->err, "%s", s->g.err);
            return open_fail(s, rc == CV_ERETRY ? CONVEYOR_EBROKER : CONVEYOR_EINVALID, code, err, errlen);
        }
        if ((found = sub_registry_load(&s->g, &s->row)) <= 0) {
            snprintf(s->err, sizeof s->err, "Conveyor's database: %s", found < 0 ? s->g.err : "the row vanished");
            return open_fail(s, CONVEYOR_EBROKER, code, err, errlen);
        }
        for (int i = 0; i < s->npatterns; i++) free(s->patterns[i]);
        free(s->patterns);
        s->patterns = NULL;
    }
    /* the subscription as registered: what is given must agree with it */
    if (strcmp(s->row.transport, transport_name(s->transport)) != 0) {
        snprintf(s->err, sizeof s->err, "subscription %s exists on %s, not %s", s->name, s->row.transport,
                 transport_name(s->transport));
        return open_fail(s, CONVEYOR_EINVALID, code, err, errlen);
    }
    if (ngiven && !same_patterns(&s->row, (char **)patterns, ngiven)) {
        char have[512] = "";
        for (int i = 0; i < s->row.npatterns; i++)
            snprintf(have + strlen(have), sizeof have - strlen(have), "%s'%s'", i ? " " : "", s->row.patterns[i]);
        snprintf(s->err, sizeof s->err,
                 "subscription %s exists with the patterns %s: give those (or none), or remove it "
                 "(conveyor-admin subscriptions remove %s) to change them", s->name, have, s->name);
        return open_fail(s, CONVEYOR_EINVALID, code, err, errlen);
    }
    if (from && strcmp(from, s->row.start_from) != 0) {
        snprintf(s->err, sizeof s->err,
                 "subscription %s exists, created with --from %s: --from counts only at creation (remove it with "
                 "conveyor-admin subscriptions remove %s to start again from %.80s)", s->name, s->row.start_from,
                 s->name, from);
        return open_fail(s, CONVEYOR_EINVALID, code, err, errlen);
    }
    if (o.partitions && o.partitions != s->row.partitions) {
        snprintf(s->err, sizeof s->err, "subscription %s exists with %d partitions, not %d (fixed at creation)",
                 s->name, s->row.partitions, o.partitions);
        return open_fail(s, CONVEYOR_EINVALID, code, err, errlen);
    }
    s->npatterns = s->row.npatterns;
    s->patterns = xcalloc((size_t)s->npatterns, sizeof *s->patterns);
    for (int i = 0; i < s->npatterns; i++) s->patterns[i] = xstrdup(s->row.patterns[i]);
    s->spec = (struct subscription_spec){s->name, (const char *const *)s->patterns, s->npatterns, s->row.partitions};
    s->has_replay = strcmp(s->row.start_from, "newest") != 0;
    s->replay_cursor = s->replay_batch_end = s->row.replay_cursor;
    s->broker_lost = existed; /* an existing one is declared again (a broker that lost them gets them back) */
    if (housekeeping(s, clock_mono_ms()) < 0) return open_fail(s, CONVEYOR_EBROKER, code, err, errlen);
    if (code) *code = CONVEYOR_OK;
    return s;
}

int conveyor_subscription_next(conveyor_subscription *s, int timeout_ms, conveyor_event **ev) {
    *ev = NULL;
    int64_t deadline = clock_mono_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    bool read_once = false; /* a timeout of 0 still reads what the broker has ready, once */
    for (;;) {
        int64_t now = clock_mono_ms();
        if (housekeeping(s, now) < 0) return CONVEYOR_EBROKER;
        if (replay_step(s) < 0) return CONVEYOR_EBROKER;
        int64_t wake = 0;
        struct held *h = pick(s, now, &wake);
        if (h) {
            if (h->state == H_WAITING || h->state == H_RETRY) h->attempts++;
            h->state = H_OUT;
            if (h->d.partition >= 0) s->nout[h->d.partition]++;
            h->pub = (conveyor_event){h->id, h->type, h->agg_id, h->d.json, h->d.len, h->attempts,
                                      h->src == SRC_LIVE ? h->d.partition : -1};
            *ev = &h->pub;
            return 0;
        }
        int64_t left = deadline - now;
        if (left <= 0 && (read_once || s->row.replaying)) return 0;
        read_once = true;
        int64_t slice = left;
        if (slice > s->next_balance_ms - now) slice = s->next_balance_ms - now;
        if (wake && slice > wake - now) slice = wake - now;
        if (slice < 0 || left <= 0) slice = 0;
        if (slice > 1000) slice = 1000;
        if (s->row.replaying) { /* the live partitions wait; the replay's rows are read by replay_step */
            struct timespec ts = {0, (slice < 100 ? slice : 100) * 1000000L};
            nanosleep(&ts, NULL);
            continue;
        }
        if (fill(s, (int)slice) < 0) return CONVEYOR_EBROKER;
    }
}

/* Removes ev's event from the list and frees it. */
static void settle(conveyor_subscription *s, struct held *h) {
    held_unlink(s, h);
    held_free(h);
}

/* Acknowledges h where it came from. Returns 0 or CONVEYOR_EBROKER. */
static int ack_source(conveyor_subscription *s, struct held *h) {
    int rc = 0;
    if (h->src == SRC_LIVE && broker_subscription_ack(s->b, &h->d) < 0) {
        snprintf(s->err, sizeof s->err, "%s: %s (the event may come again)", transport_name(s->transport),
                 broker_error(s->b));
        rc = CONVEYOR_EBROKER;
    }
    if (h->src == SRC_DEAD && (!s->db_up || sub_registry_retry_done(&s->g, h->id) < 0)) {
        if (s->db_up) lose_db(s);
        rc = CONVEYOR_EBROKER;
    }
    return rc;
}

int conveyor_subscription_ack(conveyor_subscription *s, conveyor_event *ev) {
    if (!ev) return 0;
    struct held *h = (struct held *)ev;
    int rc = ack_source(s, h);
    settle(s, h);
    return rc;
}

int conveyor_subscription_nack(conveyor_subscription *s, conveyor_event *ev, const char *reason) {
    if (!ev) return 0;
    struct held *h = (struct held *)ev;
    if (h->src == SRC_LIVE && !s->attached[h->d.partition]) { /* its partition went: it comes again to the owner */
        settle(s, h);
        return 0;
    }
    if (h->attempts < s->max_attempts) {
        if (h->d.partition >= 0 && h->state == H_OUT) s->nout[h->d.partition]--;
        h->state = H_RETRY;
        long delay = s->retry_base_ms;
        for (int k = 1; k < h->attempts && delay < RETRY_MAX_MS; k++) delay *= 2;
        h->due_ms = clock_mono_ms() + (delay < RETRY_MAX_MS ? delay : RETRY_MAX_MS);
        return 0;
    }
    /* dead: written to the dead letters first, then acknowledged */
    char why[512];
    snprintf(why, sizeof why, "%s", reason && *reason ? reason : "the handler failed");
    utf8_cut(why);
    if (!s->db_up || sub_registry_dead(&s->g, h->id, h->d.json, h->attempts, why) < 0) {
        if (s->db_up) lose_db(s);
        if (h->d.partition >= 0 && h->state == H_OUT) s->nout[h->d.partition]--;
        h->state = H_RETRY; /* tried again: it is not lost */
        h->due_ms = clock_mono_ms() + RETRY_MAX_MS;
        return CONVEYOR_EBROKER;
    }
    int rc = h->src == SRC_DEAD ? 0 : ack_source(s, h);
    settle(s, h);
    return rc < 0 ? rc : 1;
}

int conveyor_subscription_poll(conveyor_subscription *s) { return housekeeping(s, clock_mono_ms()); }

const char *conveyor_subscription_error(const conveyor_subscription *s) {
    return s && s->err[0] ? s->err : s ? "no error" : "no subscription";
}

void conveyor_subscription_close(conveyor_subscription *s) {
    if (!s) return;
    detach_all(s);
    for (struct held *h = s->head, *n; h; h = n) {
        n = h->next;
        held_free(h);
    }
    broker_close(s->b);
    sub_registry_close(&s->g);
    sub_row_free(&s->row);
    free(s->seen.v);
    free(s->seen.used);
    for (int i = 0; i < s->npatterns; i++) free(s->patterns[i]);
    free(s->patterns);
    if (s->cfg_ok) cfg_free(&s->cfg);
    free(s);
}
