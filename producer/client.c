/* client.c - the C API of conveyor.h: publish commands, wait for results. */
#include "conveyor.h"
#include "core.h"
#include "spool.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct pending {            /* a command published by this client */
    char id[ID_LEN + 1];
    char *result;           /* its result event, once seen; NULL before */
    bool seen;              /* the result arrived (later events of the command are ignored) */
};

struct conveyor_client {
    struct cfg cfg;
    struct broker *brokers[2];  /* per transport, opened on first use */
    bool reached[2];            /* per transport: a broker was reached once (a loss is then waited for) */
    int open_class;             /* the class of the last failed broker open (CV_ECONFIG: not retried) */
    bool config_error;          /* the last CONVEYOR_EBROKER was a refused configuration (CV_ECONFIG) */
    bool declared;              /* RabbitMQ topology declared */
    struct broker *events;      /* subscription, with CONVEYOR_WAIT */
    struct pending *pending;
    size_t npending, cap;
    struct spool *spool;        /* the offline spool (conveyor_set_spool), or NULL */
    int64_t spool_retry_at;     /* while the broker is away, what waits is not tried before this (monotonic ms) */
    char spool_why[512];        /* why the last try of the broker for the spool failed */
    char err[1024];
};

static int fail(conveyor_client *c, int code, const char *fmt, const char *arg) {
    snprintf(c->err, sizeof c->err, fmt, arg);
    return code;
}

conveyor_client *conveyor_open(const char *config_path, int flags, char *err, size_t errlen, int *code) {
    conveyor_client *c = calloc(1, sizeof *c);
    if (code) *code = CONVEYOR_EINVALID;
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (cfg_load(config_path, &c->cfg, err, errlen) < 0) {
        free(c);
        return NULL;
    }
    if (code) *code = CONVEYOR_EBROKER;
    if (flags & CONVEYOR_WAIT) {
        int cls = CV_ERETRY;
        c->events = broker_open_class(&c->cfg, c->cfg.events_transport, &cls, err, errlen);
        if (!c->events && cls == CV_ECONFIG && code) *code = CONVEYOR_EINVALID; /* a refused configuration */
        if (!c->events || broker_subscribe(c->events, "#") < 0) {
            if (c->events) snprintf(err, errlen, "cannot subscribe to events: %s", broker_error(c->events));
            conveyor_close(c);
            return NULL;
        }
    }
    return c;
}

void conveyor_close(conveyor_client *c) {
    if (!c) return;
    broker_close(c->brokers[0]);
    broker_close(c->brokers[1]);
    broker_close(c->events);
    spool_close(c->spool);
    for (size_t i = 0; i < c->npending; i++) free(c->pending[i].result);
    free(c->pending);
    cfg_free(&c->cfg);
    free(c);
}

const char *conveyor_error(const conveyor_client *c) { return c ? c->err : "no client"; }

int conveyor_config_error(const conveyor_client *c) { return c && c->config_error; }

static struct broker *broker_for(conveyor_client *c, enum transport t) {
    if (!c->brokers[t]) {
        c->brokers[t] = broker_open_class(&c->cfg, t, &c->open_class, c->err, sizeof c->err);
        if (!c->brokers[t]) return NULL;
        c->reached[t] = true;
    }
    if (t == TRANSPORT_RABBITMQ && !c->declared) {
        /* so that a command published before any worker started is kept */
        int rc = broker_declare(c->brokers[t]);
        if (rc < 0) {
            c->open_class = rc;
            snprintf(c->err, sizeof c->err, "%s", broker_error(c->brokers[t]));
            broker_close(c->brokers[t]);
            c->brokers[t] = NULL;
            return NULL;
        }
        c->declared = true;
    }
    return c->brokers[t];
}

/* Keeps id for conveyor_wait (with CONVEYOR_WAIT). Returns 0, or -1 when out of memory. */
static int remember(conveyor_client *c, const char *id) {
    if (!c->events) return 0;
    if (c->npending == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 16;
        struct pending *pending = realloc(c->pending, cap * sizeof *pending);
        if (!pending) return -1;
        c->pending = pending;
        c->cap = cap;
    }
    struct pending *p = &c->pending[c->npending++];
    memset(p, 0, sizeof *p);
    snprintf(p->id, sizeof p->id, "%s", id);
    return 0;
}

/* A command checked and ready to send. */
struct prepared {
    char *body;                 /* the envelope as sent (id and createdAt added); owned */
    char id[ID_LEN + 1];
    char type[CFG_NAME_MAX];
    const struct cfg_queue *q;  /* the queue that routes its type */
    bool refused;               /* CONVEYOR_EFULL: its bounded queue was full, it was not taken */
};

/* Completes envelope_json (id, createdAt) and makes the checks a worker makes.
 * Returns 0 with *p filled (free p->body), or CONVEYOR_EINVALID with the reason in c->err. */
static int prepare(conveyor_client *c, const char *envelope_json, struct prepared *p) {
    memset(p, 0, sizeof *p);
    cJSON *in = cJSON_Parse(envelope_json);
    if (!cJSON_IsObject(in)) {
        cJSON_Delete(in);
        return fail(c, CONVEYOR_EINVALID, "%s", "the command is not a JSON object");
    }
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(in, "id");
    const cJSON *created = cJSON_GetObjectItemCaseSensitive(in, "createdAt");
    char idbuf[ID_LEN + 1], ts[32];
    if (!cJSON_IsString(id)) {
        id_new(idbuf);
        cJSON_DeleteItemFromObjectCaseSensitive(in, "id");
        cJSON_AddStringToObject(in, "id", idbuf);
    }
    if (!cJSON_IsString(created)) {
        clock_rfc3339(clock_ms(), ts);
        cJSON_DeleteItemFromObjectCaseSensitive(in, "createdAt");
        cJSON_AddStringToObject(in, "createdAt", ts);
    }
    char *body = cJSON_PrintUnformatted(in);
    cJSON_Delete(in);
    if (!body) return fail(c, CONVEYOR_EINVALID, "%s", "out of memory");

    struct envelope env;
    char err[512];
    int rc = CONVEYOR_EINVALID;
    if (envelope_parse(body, strlen(body), (size_t)c->cfg.max_message_bytes, NULL, &env, err, sizeof err) < 0) {
        free(body);
        return fail(c, CONVEYOR_EINVALID, "invalid command: %s", err);
    }
    if (env.field_errors || env.has_nul) {
        char *f = env.field_errors ? cJSON_PrintUnformatted(env.field_errors) : NULL;
        snprintf(c->err, sizeof c->err, "invalid command: %s",
                 f ? f : env.has_nul ? "a string holds \\u0000" : "a field is invalid");
        free(f);
    } else if (!(p->q = cfg_queue_for(&c->cfg, env.type))) {
        snprintf(c->err, sizeof c->err, "no queue in %s routes command type '%s'", c->cfg.path, env.type);
    } else {
        snprintf(p->id, sizeof p->id, "%s", env.id);
        snprintf(p->type, sizeof p->type, "%s", env.type);
        p->body = body;
        body = NULL;
        rc = 0;
    }
    free(body);
    envelope_free(&env);
    return rc;
}

/* Sends the n prepared commands of transport t with one wait for the broker.
 * Returns 0, or the broker's class of the failure (CV_ERETRY: lost or not
 * taken now; CV_EREFUSED, CV_ECONFIG: it would fail again; CV_EFULL: those
 * with p[i].refused were refused by a full queue, the others taken) with the
 * reason in c->err. */
static int send_once(conveyor_client *c, enum transport t, struct prepared *p, int n) {
    struct broker *b = broker_for(c, t);
    if (!b) return c->open_class < 0 ? c->open_class : CV_ERETRY;
    struct outgoing_command *oc = calloc((size_t)n, sizeof *oc);
    if (!oc) return fail(c, CV_EREFUSED, "%s", "out of memory");
    for (int i = 0; i < n; i++) oc[i] = (struct outgoing_command){p[i].q, p[i].type, p[i].body, strlen(p[i].body), p[i].id,
                                                             &p[i].refused};
    int rc = broker_publish_commands(b, oc, n);
    free(oc);
    if (rc == CV_EFULL) return fail(c, rc, "%s", broker_error(b)); /* refused, not lost: the connection is fine */
    if (rc < 0) {
        snprintf(c->err, sizeof c->err, "%s", broker_error(b));
        broker_close(b); /* re-opened on the next publish */
        c->brokers[t] = NULL;
        return rc;
    }
    return 0;
}

/* send_once, and when the broker was reached before and the failure may pass
 * (CV_ERETRY: a node or a primary lost, whose replacement is reached through the
 * URL list or Sentinel; a nack; replicas that did not confirm in time), the same
 * bodies, with the same ids, again with backoff while producer.publish_retry_ms
 * has not passed (checked before each attempt; one attempt is bounded by the
 * connect and confirm timeouts): a message sent twice is applied once (the ids).
 * A broker never reached, or a refusal, fails at once; so does a full queue
 * (CV_EFULL: never sent again, it is no lost broker). Returns 0,
 * CONVEYOR_EFULL (p[i].refused: not taken; the others are), or
 * CONVEYOR_EBROKER, with the reason in c->err. */
static int send_prepared(conveyor_client *c, enum transport t, struct prepared *p, int n) {
    int64_t deadline = 0;
    int rc, delay = 100;
    c->config_error = false;
    while ((rc = send_once(c, t, p, n)) < 0) {
        c->config_error = rc == CV_ECONFIG;
        if (rc == CV_EFULL) break;
        if (!c->reached[t] || c->cfg.publish_retry_ms <= 0 || rc != CV_ERETRY) return CONVEYOR_EBROKER;
        int64_t now = clock_mono_ms();
        if (!deadline) deadline = now + c->cfg.publish_retry_ms;
        if (now >= deadline) {
            size_t len = strlen(c->err);
            snprintf(c->err + len, sizeof c->err - len, " (sent again for %d ms: producer.publish_retry_ms)",
                     c->cfg.publish_retry_ms);
            return CONVEYOR_EBROKER;
        }
        backoff_sleep(delay, NULL);
        delay = delay * 2 > 1000 ? 1000 : delay * 2;
    }
    for (int i = 0; i < n; i++) /* sent, but conveyor_wait could not find it: publish it again */
        if (!p[i].refused && remember(c, p[i].id) < 0) return fail(c, CONVEYOR_EBROKER, "%s", "out of memory");
    return rc == CV_EFULL ? CONVEYOR_EFULL : 0;
}

/* Commands sent together from the spool at most (one window of confirms). */
#define FLUSH_MAX 500
/* While the broker is away, the spool tries it at most this often (conveyor.h). */
#define SPOOL_RETRY_MS 1000

/* The broker could not take what was tried for the spool now (its reason in
 * c->err): it is not tried again for SPOOL_RETRY_MS, and the reason is kept. */
static void spool_broker_away(conveyor_client *c) {
    c->spool_retry_at = clock_mono_ms() + SPOOL_RETRY_MS;
    snprintf(c->spool_why, sizeof c->spool_why, "%s", c->err);
}

/* Appends the prepared p[0..n) to c's spool in order, durable when it returns,
 * and keeps their ids for conveyor_wait. Returns 0 (c->err then says where they
 * wait and why), or CONVEYOR_ESPOOL with the reason in c->err: the spool is full
 * (p[i].refused for each one not spooled; the ones before it are) or cannot be
 * written (none is: every p[i].refused). */
static int spool_prepared(conveyor_client *c, struct prepared *p, int n) {
    const char **bodies = calloc((size_t)n, sizeof *bodies);
    size_t *lens = calloc((size_t)n, sizeof *lens);
    int appended = 0, rc = bodies && lens ? 0 : fail(c, CV_EREFUSED, "%s", "out of memory");
    for (int i = 0; rc == 0 && i < n; i++) {
        bodies[i] = p[i].body;
        lens[i] = strlen(p[i].body);
    }
    if (rc == 0) rc = spool_append(c->spool, bodies, lens, n, &appended, c->err, sizeof c->err);
    free(bodies);
    free(lens);
    bool lost_ids = false;
    for (int i = 0; i < n; i++) { /* every one: a failed try of the broker may have marked some refused */
        p[i].refused = i >= appended;
        if (!p[i].refused && !lost_ids && remember(c, p[i].id) < 0) lost_ids = true;
    }
    if (lost_ids) return fail(c, CONVEYOR_ESPOOL, "%s", "out of memory after spooling (the spooled ones are kept "
                              "and sent: their ids are given; conveyor_wait cannot find them)");
    if (rc < 0) return CONVEYOR_ESPOOL;
    snprintf(c->err, sizeof c->err, "spooled in %s (waiting there now: %lld): %s", spool_dir(c->spool),
             spool_waiting(c->spool), c->spool_why[0] ? c->spool_why : "the broker could not be reached");
    return 0;
}

/* Sends what waits in c's spool, in order, FLUSH_MAX at a time, each run of
 * one transport with one wait for its confirms, and moves the spool's marker
 * past what was confirmed. Returns how many were sent, or CONVEYOR_EBROKER
 * (*cls the broker's class: CV_ERETRY when it could not be reached or did not
 * confirm, which may pass; what was confirmed before is marked sent),
 * CONVEYOR_EFULL (the first waiting command's queue is full), CONVEYOR_EINVALID
 * (a spooled command that no queue routes now, named by its offset: those
 * before it are sent), CONVEYOR_ESPOOL, with the reason in c->err. */
static int flush_spool(conveyor_client *c, int *cls) {
    struct spool_record *recs = calloc(FLUSH_MAX, sizeof *recs);
    struct prepared *p = calloc(FLUSH_MAX, sizeof *p);
    int sent = 0, rc = recs && p ? 0 : fail(c, CONVEYOR_ESPOOL, "%s", "out of memory");
    *cls = 0;
    c->config_error = false;
    while (rc == 0 && spool_waiting(c->spool) > 0 && sent <= INT_MAX - FLUSH_MAX) { /* a count an int holds */
        int n = spool_read(c->spool, recs, FLUSH_MAX, c->err, sizeof c->err);
        if (n <= 0) {
            rc = n < 0 ? CONVEYOR_ESPOOL : 0;
            break;
        }
        int ready = 0, bad = 0;
        while (ready < n && prepare(c, recs[ready].body, &p[ready]) == 0) ready++;
        if (ready < n) {
            char why[sizeof c->err];
            snprintf(why, sizeof why, "%s", c->err);
            snprintf(c->err, sizeof c->err, "the spooled command at offset %lld of %s/spool.log cannot be sent: %.700s",
                     (long long)recs[ready].at, spool_dir(c->spool), why);
            bad = CONVEYOR_EINVALID;
        }
        for (int i = 0, j; i < ready && rc == 0; i = j) {
            enum transport t = p[i].q->transport;
            for (j = i; j < ready && p[j].q->transport == t;) j++;
            int r = send_once(c, t, p + i, j - i), upto = j; /* p[i..upto) confirmed */
            if (r == CV_EFULL) {
                for (upto = i; upto < j && !p[upto].refused;) upto++;
                rc = CONVEYOR_EFULL;
            } else if (r < 0) {
                upto = i;
                *cls = r;
                c->config_error = r == CV_ECONFIG;
                rc = CONVEYOR_EBROKER;
            }
            if (upto > i && spool_mark_sent(c->spool, recs[upto - 1].end, upto - i, c->err, sizeof c->err) < 0)
                rc = CONVEYOR_ESPOOL;
            else sent += upto - i;
        }
        if (rc == 0) rc = bad;
        for (int i = 0; i < ready; i++) free(p[i].body);
        spool_records_free(recs, n);
    }
    free(recs);
    free(p);
    return rc < 0 ? rc : sent;
}

/* As send_prepared, through c's spool when it has one (conveyor.h, "The
 * offline spool"): what waits is sent first (tried at most once per
 * SPOOL_RETRY_MS while the broker is away); p goes to the broker once nothing
 * waits, and behind what waits in the spool else, or when the broker cannot
 * be reached now (sent once: the spool is the retry, not
 * producer.publish_retry_ms). Returns 0 (sent, or spooled), CONVEYOR_EFULL
 * (p[i].refused: refused by a full queue; every one when a full queue holds up
 * the spool), CONVEYOR_EBROKER (a refusal of the broker: not spooled),
 * CONVEYOR_ESPOOL (the spool is full, or cannot be written or sent: p[i].refused
 * for those not spooled), with the reason in c->err. */
static int send_or_spool(conveyor_client *c, enum transport t, struct prepared *p, int n) {
    if (!c->spool) return send_prepared(c, t, p, n);
    c->config_error = false;
    if (spool_waiting(c->spool) > 0 && clock_mono_ms() >= c->spool_retry_at) {
        int cls, rc = flush_spool(c, &cls);
        if (rc == CONVEYOR_EBROKER && cls == CV_ERETRY) {
            spool_broker_away(c);
        } else if (rc < 0) {
            char why[sizeof c->err];
            snprintf(why, sizeof why, "%s", c->err);
            snprintf(c->err, sizeof c->err, "not sent and not spooled: the commands waiting in the spool %s before "
                     "it cannot be sent: %.700s", spool_dir(c->spool), why);
            for (int i = 0; i < n; i++) p[i].refused = true;
            return rc == CONVEYOR_EINVALID ? CONVEYOR_ESPOOL : rc;
        }
    }
    if (spool_waiting(c->spool) == 0) {
        int rc = send_once(c, t, p, n);
        if (rc == 0 || rc == CV_EFULL) {
            for (int i = 0; i < n; i++)
                if (!p[i].refused && remember(c, p[i].id) < 0) return fail(c, CONVEYOR_EBROKER, "%s", "out of memory");
            return rc == CV_EFULL ? CONVEYOR_EFULL : 0;
        }
        c->config_error = rc == CV_ECONFIG;
        if (rc != CV_ERETRY) return CONVEYOR_EBROKER; /* a refusal: it would be refused again */
        spool_broker_away(c);
    }
    return spool_prepared(c, p, n);
}

int conveyor_set_spool(conveyor_client *c, const char *dir, long long max_bytes) {
    spool_close(c->spool);
    c->spool = NULL;
    c->spool_retry_at = 0;
    c->spool_why[0] = '\0';
    if (!dir) return 0;
    char warn[1024];
    if (spool_open(dir, max_bytes > 0 ? max_bytes : c->cfg.spool_max_bytes, &c->spool, warn, sizeof warn, c->err,
                   sizeof c->err) < 0)
        return CONVEYOR_ESPOOL;
    if (warn[0]) snprintf(c->err, sizeof c->err, "%s", warn);
    return 0;
}

int conveyor_flush(conveyor_client *c) {
    if (!c->spool) return fail(c, CONVEYOR_EINVALID, "%s", "the client has no spool (conveyor_set_spool)");
    int cls, rc = flush_spool(c, &cls);
    if (rc == CONVEYOR_EBROKER && cls == CV_ERETRY) spool_broker_away(c);
    return rc;
}

long long conveyor_spooled(const conveyor_client *c) { return c ? spool_waiting(c->spool) : 0; }

int conveyor_spool_status(const char *dir, long long *records, long long *bytes, char oldest[40], char *err,
                          size_t errlen) {
    struct spool_status st;
    if (spool_status(dir, &st, err, errlen) < 0) return CONVEYOR_ESPOOL;
    if (records) *records = st.records;
    if (bytes) *bytes = st.bytes;
    if (oldest) snprintf(oldest, 40, "%s", st.oldest);
    return 0;
}

int conveyor_publish_envelope(conveyor_client *c, const char *envelope_json, char id_out[37]) {
    struct prepared p;
    int rc = prepare(c, envelope_json, &p);
    if (rc == 0) {
        rc = send_or_spool(c, p.q->transport, &p, 1);
        snprintf(id_out, ID_LEN + 1, "%s", p.id); /* also on CONVEYOR_EBROKER: it may be queued (conveyor.h) */
    }
    free(p.body);
    return rc;
}

int conveyor_publish_batch(conveyor_client *c, const char *const *envelopes, int n, char (*ids)[37],
                           char **errors) {
    struct prepared *p = calloc((size_t)n, sizeof *p), *group = calloc((size_t)n, sizeof *group);
    int *at = calloc((size_t)n, sizeof *at); /* group[j] is p[at[j]] */
    int rc = p && group && at ? 0 : fail(c, CONVEYOR_EBROKER, "%s", "out of memory");
    for (int i = 0; i < n; i++) {
        ids[i][0] = '\0';
        errors[i] = NULL;
    }
    for (int i = 0; rc == 0 && i < n; i++)
        if (prepare(c, envelopes[i], &p[i]) < 0) errors[i] = strdup(c->err);
    /* one send per transport; a full queue of one does not keep the other's from going */
    for (int t = 0; t < 2 && (rc == 0 || rc == CONVEYOR_EFULL || rc == CONVEYOR_ESPOOL); t++) {
        int k = 0;
        for (int i = 0; i < n; i++)
            if (p[i].body && p[i].q->transport == (enum transport)t) {
                at[k] = i;
                group[k++] = p[i];
            }
        int sent = k ? send_or_spool(c, (enum transport)t, group, k) : 0;
        for (int j = 0; j < k; j++) p[at[j]].refused = group[j].refused;
        if (sent < 0) rc = sent;
    }
    free(group);
    free(at);
    for (int i = 0; p && i < n; i++) {
        if (p[i].body && (rc == 0 || ((rc == CONVEYOR_EFULL || rc == CONVEYOR_ESPOOL) && !p[i].refused)))
            snprintf(ids[i], 37, "%s", p[i].id);
        free(p[i].body);
    }
    free(p);
    return rc;
}

int conveyor_publish(conveyor_client *c, const char *type, const char *payload_json,
                     const char *correlation_id, char id_out[37]) {
    return conveyor_publish_at(c, type, payload_json, correlation_id, NULL, id_out);
}

int conveyor_publish_at(conveyor_client *c, const char *type, const char *payload_json,
                        const char *correlation_id, const char *not_before, char id_out[37]) {
    cJSON *payload = cJSON_Parse(payload_json);
    if (!cJSON_IsObject(payload)) {
        cJSON_Delete(payload);
        return fail(c, CONVEYOR_EINVALID, "%s", "the payload is not a JSON object");
    }
    char *env = envelope_build(NULL, type, payload, correlation_id, NULL, not_before);
    cJSON_Delete(payload);
    int rc = conveyor_publish_envelope(c, env, id_out);
    free(env);
    return rc;
}

static struct pending *find(conveyor_client *c, const char *id) {
    for (size_t i = 0; i < c->npending; i++)
        if (strcmp(c->pending[i].id, id) == 0) return &c->pending[i];
    return NULL;
}

int conveyor_wait(conveyor_client *c, const char *id, int timeout_ms, char **event_json) {
    *event_json = NULL;
    if (!c->events) return fail(c, CONVEYOR_EINVALID, "%s", "the client was opened without CONVEYOR_WAIT");
    struct pending *want = find(c, id);
    if (!want) return fail(c, CONVEYOR_EINVALID, "command %s was not published by this client", id);
    int64_t deadline = clock_mono_ms() + timeout_ms;
    while (!want->result) {
        int64_t left = deadline - clock_mono_ms();
        if (left <= 0) return fail(c, CONVEYOR_ETIMEOUT, "no result event for %s in time", id);
        char *json = NULL;
        int rc = broker_next_event(c->events, &json, (int)left);
        if (rc < 0) {
            /* reconnect and carry on: events published meanwhile may be missed */
            if (broker_subscribe(c->events, "#") < 0) backoff_sleep(500, NULL);
            continue;
        }
        if (rc == 0) continue;
        cJSON *ev = cJSON_Parse(json);
        const cJSON *cid = cJSON_GetObjectItemCaseSensitive(ev, "commandId");
        struct pending *p = cJSON_IsString(cid) ? find(c, cid->valuestring) : NULL;
        if (p && !p->seen) {
            /* the first event of a command is its result (the outbox keeps the order) */
            p->seen = true;
            p->result = json;
            json = NULL;
        }
        cJSON_Delete(ev);
        free(json);
    }
    const char *res = want->result;
    cJSON *ev = cJSON_Parse(res);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(ev, "type");
    bool rejected = cJSON_IsString(type) && strcmp(type->valuestring, "command.rejected") == 0;
    cJSON_Delete(ev);
    *event_json = want->result;
    want->result = NULL;
    return rejected ? CONVEYOR_REJECTED : 0;
}
