/* metrics.c - the Prometheus text exposition (format 0.0.4) of the pool: the
 * scoreboard's counters summed over every slot of a queue (so over every
 * process that ever ran there, those that died included), and the gauges the
 * HTTP child sampled. Every label set of the configuration is written from the
 * start, at 0. Names: README, "Metrics and health".
 */
#include "http.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef CONVEYOR_VERSION
#define CONVEYOR_VERSION "unknown"
#endif

struct out {
    char *buf;
    size_t len, cap;
};

/* Appends printf-style text to o (grows it; xrealloc never fails). */
static void put(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(struct out *o, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
        va_end(ap);
        if (n < 0) return;
        if ((size_t)n < o->cap - o->len) {
            o->len += (size_t)n;
            return;
        }
        o->cap = o->cap * 2 + (size_t)n + 1;
        o->buf = xrealloc(o->buf, o->cap);
    }
}

/* s as a label value (backslash, double quote and newline escaped) in out. */
static const char *label(const char *s, char out[2 * CFG_NAME_MAX + 1]) {
    size_t k = 0;
    for (; *s && k < 2 * CFG_NAME_MAX - 1; s++) {
        if (*s == '\\' || *s == '"' || *s == '\n') out[k++] = '\\';
        out[k++] = *s == '\n' ? 'n' : *s;
    }
    out[k] = '\0';
    return out;
}

static void header(struct out *o, const char *name, const char *type, const char *help) {
    put(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static uint64_t load(const uint64_t *c) { return __atomic_load_n(c, __ATOMIC_RELAXED); }

/* The counts of type in slot s, or NULL when s does not count it. */
static const struct sb_type_counts *counts_of(const struct sb_slot *s, const char *type) {
    for (int t = 0; t <= s->ntypes; t++)
        if (strcmp(s->types[t], type) == 0) return &s->counts[t];
    return NULL;
}

/* The types of q written apart: its commands (at most SB_TYPES - 1), then "unknown". */
static int ntypes_of(const struct cfg_queue *q) { return q->ncommands < SB_TYPES - 1 ? q->ncommands : SB_TYPES - 1; }

/* A histogram's samples: name{labels,le=...} cumulative, _sum (sum_scale: per second), _count. */
static void histogram(struct out *o, const char *name, const char *labels, const double *bounds, int nbounds,
                      const uint64_t *buckets, double sum_s) {
    uint64_t cum = 0;
    for (int b = 0; b < nbounds; b++) {
        cum += buckets[b];
        put(o, "%s_bucket{%s,le=\"%g\"} %llu\n", name, labels, bounds[b], (unsigned long long)cum);
    }
    cum += buckets[nbounds];
    put(o, "%s_bucket{%s,le=\"+Inf\"} %llu\n%s_sum{%s} %.6f\n%s_count{%s} %llu\n", name, labels,
        (unsigned long long)cum, name, labels, sum_s, name, labels, (unsigned long long)cum);
}

static void commands(struct out *o, const struct cfg *cfg, const struct scoreboard *sb) {
    char ql[2 * CFG_NAME_MAX + 1], tl[2 * CFG_NAME_MAX + 1];
    header(o, "conveyor_commands_total", "counter", "Commands settled, by queue, type and outcome.");
    for (int i = 0; i < cfg->nqueues; i++) {
        const struct cfg_queue *q = &cfg->queues[i];
        for (int t = 0; t <= ntypes_of(q); t++) {
            const char *type = t < ntypes_of(q) ? q->commands[t] : "unknown";
            for (int oc = 0; oc < SB_NOUTCOMES; oc++) {
                if (t == ntypes_of(q) && oc != SB_DEAD) continue; /* an unknown type can only be dead */
                uint64_t n = 0;
                for (int k = 0; sb && k < sb->nslots; k++) {
                    const struct sb_type_counts *c = sb_is_worker_of(&sb->slot[k], q) ? counts_of(&sb->slot[k], type) : NULL;
                    if (c) n += load(&c->outcomes[oc]);
                }
                put(o, "conveyor_commands_total{queue=\"%s\",type=\"%s\",outcome=\"%s\"} %llu\n", label(q->name, ql),
                    label(type, tl), sb_outcome_names[oc], (unsigned long long)n);
            }
        }
    }
    header(o, "conveyor_command_duration_seconds", "histogram",
           "Handler start to commit, per command (a batch's commit counts for each of its commands).");
    for (int i = 0; i < cfg->nqueues; i++) {
        const struct cfg_queue *q = &cfg->queues[i];
        for (int t = 0; t < ntypes_of(q); t++) {
            uint64_t buckets[SB_DURATION_BUCKETS + 1] = {0}, sum_us = 0;
            for (int k = 0; sb && k < sb->nslots; k++) {
                const struct sb_type_counts *c =
                    sb_is_worker_of(&sb->slot[k], q) ? counts_of(&sb->slot[k], q->commands[t]) : NULL;
                if (!c) continue;
                for (int b = 0; b <= sb_duration_nbounds; b++) buckets[b] += load(&c->duration[b]);
                sum_us += load(&c->duration_sum_us);
            }
            char labels[5 * CFG_NAME_MAX + 32];
            snprintf(labels, sizeof labels, "queue=\"%s\",type=\"%s\"", label(q->name, ql), label(q->commands[t], tl));
            histogram(o, "conveyor_command_duration_seconds", labels, sb_duration_bounds, sb_duration_nbounds,
                      buckets, (double)sum_us / 1e6);
        }
    }
    header(o, "conveyor_command_latency_seconds", "histogram",
           "A command's createdAt to its commit (commands without createdAt are left out).");
    for (int i = 0; i < cfg->nqueues; i++) {
        const struct cfg_queue *q = &cfg->queues[i];
        struct sb_queue_totals t;
        sb_queue_totals(q, &t);
        char labels[2 * CFG_NAME_MAX + 16];
        snprintf(labels, sizeof labels, "queue=\"%s\"", label(q->name, ql));
        histogram(o, "conveyor_command_latency_seconds", labels, sb_latency_bounds, SB_LATENCY_BUCKETS, t.latency,
                  (double)t.latency_sum_ms / 1e3);
    }
}

static void workers(struct out *o, const struct cfg *cfg, const struct scoreboard *sb) {
    char ql[2 * CFG_NAME_MAX + 1];
    header(o, "conveyor_workers", "gauge", "Worker positions of the pool, by queue and state.");
    for (int i = 0; i < cfg->nqueues; i++) {
        int n[SB_NSTATES] = {0};
        for (int k = 0; sb && k < sb->nslots; k++)
            if (sb_is_worker_of(&sb->slot[k], &cfg->queues[i])) {
                int st = __atomic_load_n(&sb->slot[k].state, __ATOMIC_RELAXED);
                if (st >= 0 && st < SB_NSTATES) n[st]++;
            }
        for (int st = 0; st < SB_NSTATES; st++)
            if (st != SB_RETIRED)
                put(o, "conveyor_workers{queue=\"%s\",state=\"%s\"} %d\n", label(cfg->queues[i].name, ql),
                    sb_state_names[st], n[st]);
    }
    header(o, "conveyor_worker_restarts_total", "counter",
           "Workers the supervisor restarted, by queue and why (signal, exit, config, recycled).");
    for (int i = 0; i < cfg->nqueues; i++)
        for (int r = 0; r < SB_NRESTARTS; r++) {
            uint64_t n = 0;
            for (int k = 0; sb && k < sb->nslots; k++)
                if (sb_is_worker_of(&sb->slot[k], &cfg->queues[i])) n += load(&sb->slot[k].restarts[r]);
            put(o, "conveyor_worker_restarts_total{queue=\"%s\",reason=\"%s\"} %llu\n", label(cfg->queues[i].name, ql),
                sb_restart_names[r], (unsigned long long)n);
        }
    header(o, "conveyor_worker_resident_bytes", "gauge", "Resident memory of each running worker, by queue and slot.");
    for (int k = 0; sb && k < sb->nslots; k++) {
        const struct sb_slot *s = &sb->slot[k];
        pid_t pid = __atomic_load_n(&s->pid, __ATOMIC_RELAXED);
        if (!__atomic_load_n(&s->used, __ATOMIC_ACQUIRE) || s->kind != SB_WORKER || !pid) continue;
        long long rss;
        if (sb_resident_bytes(pid, &rss)) put(o, "conveyor_worker_resident_bytes{queue=\"%s\",slot=\"%d\"} %lld\n", label(s->queue, ql), k, rss);
    }
}

/* The lanes of the laned queues (sampled with the brokers): each lane's
 * depth, and its oldest command's age where known (Redis: the lane's head;
 * RabbitMQ: the oldest its workers hold, the pools' lane_oldest rows; no line
 * when not known). lane="<class>.<i>". */
static void lane_gauges(struct out *o, const struct cfg *cfg, const struct http_sample *s) {
    char ql[2 * CFG_NAME_MAX + 1], lane[32];
    header(o, "conveyor_lane_depth", "gauge", "Commands waiting in a lane of a queue with lanes (sampled).");
    for (int i = 0; i < cfg->nqueues && s->lanes; i++)
        for (int k = 0; s->lanes[i] && k < LANE_CLASSES * cfg->queues[i].lanes; k++)
            put(o, "conveyor_lane_depth{queue=\"%s\",lane=\"%s\"} %ld\n", label(cfg->queues[i].name, ql),
                lane_label(cfg->queues[i].lanes, k, lane, sizeof lane), s->lanes[i][k].depth);
    header(o, "conveyor_lane_oldest_age_seconds", "gauge",
           "Age of the oldest command waiting in a lane, by its createdAt (sampled; RabbitMQ: the oldest "
           "its workers hold, an upper bound while they are busy).");
    for (int i = 0; i < cfg->nqueues && s->lanes; i++)
        for (int k = 0; s->lanes[i] && k < LANE_CLASSES * cfg->queues[i].lanes; k++)
            if (s->lanes[i][k].oldest_age_s >= 0)
                put(o, "conveyor_lane_oldest_age_seconds{queue=\"%s\",lane=\"%s\"} %.3f\n",
                    label(cfg->queues[i].name, ql), lane_label(cfg->queues[i].lanes, k, lane, sizeof lane),
                    s->lanes[i][k].oldest_age_s);
}

/* The producers' outboxes (forward_state, as their forwarders last counted
 * them in each producer's database): no line for a producer not counted yet. */
static void forward_gauges(struct out *o, const struct http_sample *s) {
    char pl[2 * CFG_NAME_MAX + 1];
    static const char *const names[4][2] = {
        {"conveyor_forward_pending", "Commands in a producer's outbox not forwarded yet (its database's count)."},
        {"conveyor_forward_oldest_age_seconds", "Age of the oldest command waiting in a producer's outbox (0: none)."},
        {"conveyor_forward_failed", "Rows of a producer's outbox kept as failed (conveyor-admin producer status)."},
        {"conveyor_forward_report_age_seconds", "How long ago a forwarder counted the producer's outbox."}};
    for (int g = 0; g < 4; g++) {
        header(o, names[g][0], "gauge", names[g][1]);
        for (int i = 0; i < s->nproducers && s->producers; i++) {
            const struct forward_state *st = &s->producers[i];
            if (!st->read) continue;
            double v = g == 0 ? (double)st->pending : g == 1 ? st->oldest_age_s : g == 2 ? (double)st->failed
                                                                                         : st->report_age_s;
            put(o, "%s{producer=\"%s\"} %.*f\n", names[g][0], label(st->producer->name, pl), g % 2 ? 3 : 0, v);
        }
    }
}

/* The durable subscriptions (docs/contract.md section 13), from their registry
 * rows as the pools last counted them: no lag, age or gap line for one not
 * counted yet; its dead letters always. */
static void subscription_gauges(struct out *o, const struct http_sample *s) {
    char sl[2 * CFG_NAME_MAX + 1];
    static const char *const names[4][2] = {
        {"conveyor_subscription_lag", "Events a durable subscription has not settled yet (RabbitMQ: ready in its "
                                      "queues; Redis: its slowest partition's lag + pending), as a pool last counted."},
        {"conveyor_subscription_oldest_age_seconds",
         "Age of the oldest event a durable subscription has not settled (RabbitMQ: since its queues were last seen "
         "empty, an upper bound; 0: none)."},
        {"conveyor_subscription_gap", "1 when the Redis stream was trimmed past entries a subscription's partition "
                                      "had not read (kept until it is removed)."},
        {"conveyor_subscription_dead", "Dead letters of a durable subscription (conveyor-admin subscriptions dead)."}};
    for (int g = 0; g < 4; g++) {
        header(o, names[g][0], "gauge", names[g][1]);
        for (int i = 0; i < s->nsubscriptions && s->subscriptions; i++) {
            const struct subscription_row *r = &s->subscriptions[i];
            if (g < 3 && r->lag < 0) continue; /* not counted yet */
            if (g == 1) put(o, "%s{subscription=\"%s\"} %.3f\n", names[g][0], label(r->name, sl),
                            r->oldest_age_s < 0 ? 0 : r->oldest_age_s);
            else put(o, "%s{subscription=\"%s\"} %ld\n", names[g][0], label(r->name, sl),
                     g == 0 ? r->lag : g == 2 ? (long)(r->gap != NULL) : r->dead);
        }
    }
}

static void gauges(struct out *o, const struct cfg *cfg, const struct scoreboard *sb, const struct http_sample *s) {
    char ql[2 * CFG_NAME_MAX + 1];
    static const char *const names[4][2] = {
        {"conveyor_queue_depth", "Messages waiting in the queue (sampled)."},
        {"conveyor_queue_inflight", "Messages the pool's workers hold now."},
        {"conveyor_retry_scheduled", "Messages waiting for a retry (sampled)."},
        {"conveyor_dead_letters", "Dead letters of the queue (sampled)."}};
    for (int g = 0; g < 4; g++) {
        header(o, names[g][0], "gauge", names[g][1]);
        for (int i = 0; i < cfg->nqueues; i++) {
            long v = 0;
            if (g == 1) {
                struct sb_queue_totals t;
                sb_queue_totals(&cfg->queues[i], &t);
                v = t.in_hand;
            } else if (i < s->nqueues && s->queues) {
                v = g == 0 ? s->queues[i].waiting : g == 2 ? s->queues[i].retrying : s->queues[i].dead;
            }
            put(o, "%s{queue=\"%s\"} %ld\n", names[g][0], label(cfg->queues[i].name, ql), v);
        }
    }
    header(o, "conveyor_queue_paused", "gauge", "1 while the queue is paused for every pool (conveyor-admin queue pause).");
    for (int i = 0; i < cfg->nqueues; i++)
        put(o, "conveyor_queue_paused{queue=\"%s\"} %d\n", label(cfg->queues[i].name, ql), queue_paused(&cfg->queues[i]) ? 1 : 0);
    header(o, "conveyor_queue_max_length", "gauge", "The queue's max_length: a new command is refused at this depth (0: unbounded).");
    for (int i = 0; i < cfg->nqueues; i++)
        put(o, "conveyor_queue_max_length{queue=\"%s\"} %ld\n", label(cfg->queues[i].name, ql), cfg->queues[i].max_length);
    lane_gauges(o, cfg, s);
    forward_gauges(o, s);
    subscription_gauges(o, s);
    uint64_t opens = 0;
    int breaker = (int)breaker_read(NULL, 0, &opens);
    header(o, "conveyor_breaker_state", "gauge", "The pool's breaker around a dependency: 0 closed, 1 half-open, 2 open.");
    put(o, "conveyor_breaker_state{dependency=\"postgresql\"} %d\n", breaker);
    header(o, "conveyor_breaker_opened_total", "counter", "Times the pool's breaker opened (from closed).");
    put(o, "conveyor_breaker_opened_total{dependency=\"postgresql\"} %llu\n", (unsigned long long)opens);
    header(o, "conveyor_outbox_pending", "gauge", "Outbox rows not published yet (sampled).");
    put(o, "conveyor_outbox_pending %ld\n", s->outbox_pending);
    header(o, "conveyor_outbox_oldest_age_seconds", "gauge", "Age of the oldest unpublished outbox row (sampled).");
    put(o, "conveyor_outbox_oldest_age_seconds %.3f\n", s->outbox_oldest_s);
    header(o, "conveyor_events_published_total", "counter", "Events the pool's relay published, by type.");
    for (int t = 0; t <= SB_EVENT_TYPES; t++) {
        uint64_t n = 0;
        for (int k = 0; sb && k < sb->nslots; k++)
            if (__atomic_load_n(&sb->slot[k].used, __ATOMIC_ACQUIRE) && sb->slot[k].kind == SB_RELAY)
                n += load(&sb->slot[k].events[t]);
        put(o, "conveyor_events_published_total{type=\"%s\"} %llu\n", t < SB_EVENT_TYPES ? sb_event_types[t] : "other",
            (unsigned long long)n);
    }
    header(o, "conveyor_relay_active", "gauge", "1 while this pool's relay holds the relay lock.");
    put(o, "conveyor_relay_active %d\n", relay_wake_is_local() ? 1 : 0);
    header(o, "conveyor_dependency_up", "gauge", "1 when the last sample reached the server (those the pool uses).");
    put(o, "conveyor_dependency_up{dependency=\"postgresql\"} %d\n", s->db_up);
    if (s->broker_used[TRANSPORT_RABBITMQ])
        put(o, "conveyor_dependency_up{dependency=\"rabbitmq\"} %d\n", s->broker_up[TRANSPORT_RABBITMQ]);
    if (s->broker_used[TRANSPORT_REDIS])
        put(o, "conveyor_dependency_up{dependency=\"redis\"} %d\n", s->broker_up[TRANSPORT_REDIS]);
    header(o, "conveyor_broker_stalled", "gauge",
           "The pool's processes stalled on a broker that does not answer (a reply overdue, or a bound "
           "fired on a silent server within twice broker.reply_timeout_ms), by transport.");
    for (int t = TRANSPORT_RABBITMQ; t <= TRANSPORT_REDIS; t++)
        if (s->broker_used[t])
            put(o, "conveyor_broker_stalled{transport=\"%s\"} %d\n", transport_name((enum transport)t),
                broker_stalled_count(cfg, (enum transport)t, NULL, 0));
    header(o, "conveyor_broker_silences_total", "counter",
           "Bounds (broker.reply_timeout_ms, a missed heartbeat, an idle connection's probe) that fired on a broker "
           "that did not answer, by transport: each moved its process on.");
    for (int t = TRANSPORT_RABBITMQ; t <= TRANSPORT_REDIS; t++)
        if (s->broker_used[t])
            put(o, "conveyor_broker_silences_total{transport=\"%s\"} %llu\n", transport_name((enum transport)t),
                (unsigned long long)broker_silences_total(cfg, (enum transport)t));
    header(o, "conveyor_build_info", "gauge", "The running version, as a label.");
    put(o, "conveyor_build_info{version=\"%s\"} 1\n", CONVEYOR_VERSION);
}

/* What waits for its time (sampled from PostgreSQL, so every pool shows what
 * the database committed): the parked commands per queue and the first one's
 * due time; per configured schedule its last slot, slots fired and missed. */
static void scheduled(struct out *o, const struct cfg *cfg, const struct http_sample *s) {
    char l[2 * CFG_NAME_MAX + 1];
    header(o, "conveyor_scheduled_commands", "gauge",
           "Commands parked until their time (a notBefore, a schedule's slot), by the queue they go to (sampled "
           "from PostgreSQL every 10 s; less often while a count takes over 0.1 s: 100 times its duration).");
    for (int i = 0; i < cfg->nqueues; i++)
        put(o, "conveyor_scheduled_commands{queue=\"%s\"} %ld\n", label(cfg->queues[i].name, l),
            s->parked && i < s->nqueues ? s->parked[i].count : 0);
    header(o, "conveyor_scheduled_next_due_timestamp_seconds", "gauge",
           "Unix time at which the queue's first parked command is due; 0 when none is parked (sampled).");
    for (int i = 0; i < cfg->nqueues; i++)
        put(o, "conveyor_scheduled_next_due_timestamp_seconds{queue=\"%s\"} %.3f\n", label(cfg->queues[i].name, l),
            s->parked && i < s->nqueues ? s->parked[i].next_due_s : 0);
    static const char *const names[3][3] = {
        {"conveyor_schedule_last_slot_timestamp_seconds", "gauge",
         "Unix time of the schedule's last slot fired or skipped; 0 before its first."},
        {"conveyor_schedule_fired_total", "counter", "Slots of the schedule fired (manual runs not counted)."},
        {"conveyor_schedule_missed_total", "counter", "Slots of the schedule skipped by its catch_up."}};
    for (int m = 0; m < 3; m++) {
        header(o, names[m][0], names[m][1], names[m][2]);
        for (int i = 0; i < cfg->nschedules; i++) {
            const struct schedule_state *st = s->schedules && i < s->nschedules ? &s->schedules[i] : NULL;
            label(cfg->schedules[i].name, l);
            if (m == 0) put(o, "%s{schedule=\"%s\"} %.3f\n", names[m][0], l, st ? st->last_slot_s : 0);
            else put(o, "%s{schedule=\"%s\"} %lld\n", names[m][0], l, st ? (m == 1 ? st->fired : st->missed) : 0);
        }
    }
}

/* The rate limits (sampled from PostgreSQL: every pool shows what the
 * database committed, so a sum over pools counts each command once per pool). */
static void rate_limits(struct out *o, const struct cfg *cfg, const struct http_sample *s) {
    char l[2 * CFG_NAME_MAX + 1];
    header(o, "conveyor_limit_tokens", "gauge",
           "Tokens the rate limit has now (a keyed limit: its emptiest bucket), by the database's clock (sampled).");
    for (int i = 0; i < cfg->nrate_limits; i++)
        put(o, "conveyor_limit_tokens{limit=\"%s\"} %.3f\n", label(cfg->rate_limits[i].name, l),
            s->limits && i < s->nrate_limits ? s->limits[i].tokens : cfg->rate_limits[i].burst);
    header(o, "conveyor_limited_total", "counter",
           "Commands the rate limit held: parked for a token (over=\"wait\"; a command may wait more than once) or "
           "rejected RATE_LIMITED (over=\"reject\"), as committed in PostgreSQL (the same in every pool: do not sum).");
    for (int i = 0; i < cfg->nrate_limits; i++) {
        const struct rate_limit_state *st = s->limits && i < s->nrate_limits ? &s->limits[i] : NULL;
        label(cfg->rate_limits[i].name, l);
        put(o, "conveyor_limited_total{limit=\"%s\",over=\"wait\"} %lld\n", l, st ? st->waited : 0);
        put(o, "conveyor_limited_total{limit=\"%s\",over=\"reject\"} %lld\n", l, st ? st->rejected : 0);
    }
}

void metrics_render(const struct cfg *cfg, const struct http_sample *s, char **buf, size_t *len) {
    struct out o = {xmalloc(16384), 0, 16384};
    o.buf[0] = '\0';
    const struct scoreboard *sb = scoreboard_get();
    commands(&o, cfg, sb);
    workers(&o, cfg, sb);
    gauges(&o, cfg, sb, s);
    scheduled(&o, cfg, s);
    rate_limits(&o, cfg, s);
    *buf = o.buf;
    *len = o.len;
}
