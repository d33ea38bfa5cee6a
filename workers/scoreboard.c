/* scoreboard.c - the pool's counters, in memory shared by all its processes.
 *
 * The supervisor maps one region (MAP_SHARED | MAP_ANONYMOUS) before it forks
 * anything; every child inherits it. It holds one slot per worker position,
 * one for the relay and one for the reaper. A child writes only its own slot
 * (single writer: plain relaxed loads and stores, no lock, no atomic
 * read-modify-write); the supervisor writes a slot's pid, state and restart
 * counts, fields the child never writes. A restarted child takes the slot of
 * the position it replaces and goes on adding to it, so the counts of a child
 * that died (kill -9 included) stay; so do the outcomes of a batch it committed
 * but had not counted (pending_xid: the next process of the slot asks the
 * database whether that transaction committed; worker.c). Readers (the HTTP child) read each 64-bit
 * counter with a relaxed load: a scrape may see one counter of a command moved
 * and another not yet, never a torn value.
 *
 * Size. The region is sized once, at start: twice the slots the configuration
 * needs, plus a few, so that a SIGHUP reload (whose new children run beside
 * the old ones while those drain) finds fresh slots. A new child takes a slot
 * that an exited child of the same queue, position and command types left
 * (its counts carry on), else an unused one; when none is left (a reload that
 * added many workers) it runs without one: its commands are not counted, and
 * this is logged (restart the pool to resize the scoreboard).
 */
#include "workers.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

double sb_duration_bounds[SB_DURATION_BUCKETS] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                  0.1,    0.25,  0.5,    1,     2.5,  5,     10};
int sb_duration_nbounds = 14;
/* Above 10 s: the bounds added until the longest a command can take is covered. */
static const double duration_ladder[] = {30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800};

/* Extends sb_duration_bounds past 10 s up to the longest time a command can
 * take under cfg's timeouts: a batch whose every statement runs near its
 * queue's statement_timeout_ms (batch_size x statement_timeout_ms, the slowest
 * queue's). Above the ladder, the last bound is that time itself. */
static void duration_bounds_for(const struct cfg *cfg) {
    double longest = 0;
    for (int i = 0; i < cfg->nqueues; i++) {
        double s = (double)cfg->queues[i].batch_size * cfg->queues[i].statement_timeout_ms / 1000.0;
        if (s > longest) longest = s;
    }
    int n = 14;
    for (size_t k = 0; k < sizeof duration_ladder / sizeof *duration_ladder && sb_duration_bounds[n - 1] < longest; k++)
        sb_duration_bounds[n++] = duration_ladder[k];
    if (sb_duration_bounds[n - 1] < longest) sb_duration_bounds[n - 1] = longest;
    sb_duration_nbounds = n;
}
const double sb_latency_bounds[SB_LATENCY_BUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,    2.5,
                                                      5,     10,   30,    60,   120, 300, 900, 1800, 3600};
/* The event types the handlers emit (ctx_emit) and command.rejected; any other counts as "other". */
const char *const sb_event_types[SB_EVENT_TYPES] = {
    "command.rejected", "user.registered", "user.passwordChanged", "product.created", "product.updated",
    "product.deleted",  "stock.updated",   "stock.low",            "stock.depleted",  "order.placed",
    "order.cancelled"};
const char *const sb_state_names[SB_NSTATES] = {"down", "starting", "idle", "busy", "retired"};
const char *const sb_outcome_names[SB_NOUTCOMES] = {"applied", "rejected", "duplicate", "retried", "dead"};
const char *const sb_restart_names[SB_NRESTARTS] = {"signal", "exit", "config", "recycled"};

static struct scoreboard *board; /* NULL until scoreboard_init: nothing is counted */
static struct sb_slot *mine;     /* this process's slot, or NULL */

/* Adds n to a counter of the caller's own slot (single writer: no read-modify-write atomics). */
static inline void add(uint64_t *c, uint64_t n) {
    __atomic_store_n(c, __atomic_load_n(c, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

bool scoreboard_init(const struct cfg *cfg) {
    int n = 2;
    for (int i = 0; i < cfg->nqueues; i++) n += cfg->queues[i].workers;
    n = 2 * n + 4;
    size_t size = sizeof(struct scoreboard) + (size_t)n * sizeof(struct sb_slot);
    // cppcheck-suppress invalidFunctionArg ; fd -1 is what MAP_ANONYMOUS asks for (Linux ignores it)
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    board = p; /* zero-filled by mmap */
    duration_bounds_for(cfg); /* before any fork: every child sees the same bounds */
    board->nslots = n;
    return true;
}

const struct scoreboard *scoreboard_get(void) { return board; }

/* True when slot s was made for the same position as (kind, q, position) would be. */
static bool same_position(const struct sb_slot *s, enum sb_kind kind, const struct cfg_queue *q, int position) {
    if (s->kind != (int32_t)kind || s->position != position) return false;
    if (kind != SB_WORKER) return true;
    if (strcmp(s->queue, q->name) != 0) return false;
    int ntypes = q->ncommands < SB_TYPES - 1 ? q->ncommands : SB_TYPES - 1;
    if (s->ntypes != ntypes) return false;
    for (int t = 0; t < ntypes; t++)
        if (strcmp(s->types[t], q->commands[t]) != 0) return false;
    return true;
}

int scoreboard_assign(enum sb_kind kind, const struct cfg_queue *q, int position) {
    if (!board) return SB_NO_SLOT;
    int fresh = -1;
    for (int i = 0; i < board->nslots; i++) {
        struct sb_slot *s = &board->slot[i];
        if (!s->used) {
            if (fresh < 0) fresh = i;
            continue;
        }
        if (__atomic_load_n(&s->pid, __ATOMIC_RELAXED) == 0 && !s->taken && same_position(s, kind, q, position)) {
            s->taken = 1;
            return i;
        }
    }
    if (fresh < 0) {
        log_warn("scoreboard full (%d slots): a %s starts without one and is not counted; restart the pool to "
                 "resize it", board->nslots, kind == SB_WORKER ? "worker" : "process");
        return SB_NO_SLOT;
    }
    struct sb_slot *s = &board->slot[fresh];
    s->kind = kind;
    s->position = position;
    if (kind == SB_WORKER) {
        snprintf(s->queue, sizeof s->queue, "%s", q->name);
        s->ntypes = q->ncommands < SB_TYPES - 1 ? q->ncommands : SB_TYPES - 1;
        for (int t = 0; t < s->ntypes; t++) snprintf(s->types[t], sizeof s->types[t], "%s", q->commands[t]);
    }
    snprintf(s->types[s->ntypes], sizeof s->types[0], "unknown");
    s->taken = 1;
    __atomic_store_n(&s->used, 1, __ATOMIC_RELEASE); /* the names above are complete before a reader looks */
    return fresh;
}

void scoreboard_release(int slot) {
    if (!board || slot < 0) return;
    board->slot[slot].taken = 0;
    __atomic_store_n(&board->slot[slot].state, SB_RETIRED, __ATOMIC_RELAXED);
}

void scoreboard_spawning(int slot) {
    if (board && slot >= 0) __atomic_store_n(&board->slot[slot].state, SB_STARTING, __ATOMIC_RELAXED);
}

void scoreboard_started(int slot, pid_t pid) {
    if (board && slot >= 0) __atomic_store_n(&board->slot[slot].pid, pid, __ATOMIC_RELAXED);
}

void scoreboard_exited(pid_t pid, int restart_reason, bool retired) {
    if (!board) return;
    for (int i = 0; i < board->nslots; i++) {
        struct sb_slot *s = &board->slot[i];
        if (!s->used || __atomic_load_n(&s->pid, __ATOMIC_RELAXED) != pid) continue;
        __atomic_store_n(&s->pid, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->in_hand, 0, __ATOMIC_RELAXED);
        for (int k = 0; k < LANE_CLASSES * LANES_MAX; k++) __atomic_store_n(&s->lane_oldest_ms[k], 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->state, retired ? SB_RETIRED : SB_DOWN, __ATOMIC_RELAXED);
        if (retired) s->taken = 0;
        if (restart_reason >= 0 && restart_reason < SB_NRESTARTS) add(&s->restarts[restart_reason], 1);
        return;
    }
}

void scoreboard_set_flags(bool draining) {
    if (!board) return;
    __atomic_store_n(&board->draining, draining ? 1 : 0, __ATOMIC_RELAXED);
}

void scoreboard_tick(void) {
    if (board) __atomic_store_n(&board->supervisor_tick_ms, clock_mono_ms(), __ATOMIC_RELAXED);
}

void scoreboard_attach(int slot) { mine = board && slot >= 0 ? &board->slot[slot] : NULL; }

struct sb_slot *scoreboard_mine(void) { return mine; }

void scoreboard_state(enum sb_state state, int in_hand) {
    if (!mine) return;
    __atomic_store_n(&mine->in_hand, in_hand, __ATOMIC_RELAXED);
    __atomic_store_n(&mine->state, state, __ATOMIC_RELAXED);
}

void scoreboard_lane_oldest(const int64_t *ms, int n) {
    if (!mine) return;
    for (int k = 0; k < LANE_CLASSES * LANES_MAX; k++)
        __atomic_store_n(&mine->lane_oldest_ms[k], k < n ? ms[k] : 0, __ATOMIC_RELAXED);
}

/* The index of type among the slot's types, or that of "unknown". */
static int type_index(const struct sb_slot *s, const char *type) {
    for (int t = 0; type && t < s->ntypes; t++)
        if (strcmp(s->types[t], type) == 0) return t;
    return s->ntypes;
}

/* The bucket of value v among n upper bounds (n: above all of them). */
static int bucket(const double *bounds, int n, double v) {
    int b = 0;
    while (b < n && v > bounds[b]) b++;
    return b;
}

void scoreboard_outcome(const char *type, enum sb_outcome outcome) {
    if (!mine) return;
    add(&mine->counts[type_index(mine, type)].outcomes[outcome], 1);
}

void scoreboard_committed(const char *type, enum sb_outcome outcome, int64_t started_us, int64_t commit_us,
                          int64_t created_ms, int64_t commit_wall_ms) {
    if (!mine) return;
    struct sb_type_counts *c = &mine->counts[type_index(mine, type)];
    add(&c->outcomes[outcome], 1);
    if (outcome != SB_DUPLICATE && started_us > 0 && commit_us >= started_us) { /* a duplicate did not run */
        int64_t us = commit_us - started_us;
        add(&c->duration[bucket(sb_duration_bounds, sb_duration_nbounds, (double)us / 1e6)], 1);
        add(&c->duration_sum_us, (uint64_t)us);
    }
    int64_t created = created_ms;
    if (created >= 0 && outcome != SB_DUPLICATE) { /* latency: of the commands whose work committed */
        int64_t ms = commit_wall_ms > created ? commit_wall_ms - created : 0; /* a clock ahead of ours: 0 */
        add(&mine->latency[bucket(sb_latency_bounds, SB_LATENCY_BUCKETS, (double)ms / 1e3)], 1);
        add(&mine->latency_sum_ms, (uint64_t)ms);
    }
}

void scoreboard_pending_begin(void) {
    if (!mine) return;
    __atomic_store_n(&mine->pending_xid, 0, __ATOMIC_RELAXED);
    memset(mine->pending, 0, sizeof mine->pending);
}

void scoreboard_pending_add(const char *type, enum sb_outcome outcome) {
    if (mine && (outcome == SB_APPLIED || outcome == SB_REJECTED)) mine->pending[type_index(mine, type)][outcome]++;
}

void scoreboard_pending_arm(uint64_t xid) {
    if (mine) __atomic_store_n(&mine->pending_xid, xid, __ATOMIC_RELEASE); /* the counts above are complete */
}

uint64_t scoreboard_pending_xid(void) { return mine ? __atomic_load_n(&mine->pending_xid, __ATOMIC_ACQUIRE) : 0; }

void scoreboard_pending_drop(void) {
    if (mine) __atomic_store_n(&mine->pending_xid, 0, __ATOMIC_RELAXED);
}

void scoreboard_pending_fold(void) {
    if (!mine || !scoreboard_pending_xid()) return;
    for (int t = 0; t < SB_TYPES; t++)
        for (int o = 0; o < 2; o++)
            if (mine->pending[t][o]) add(&mine->counts[t].outcomes[o], mine->pending[t][o]);
    scoreboard_pending_drop();
}

void scoreboard_event_published(const char *type) {
    if (!mine) return;
    int t = 0;
    while (t < SB_EVENT_TYPES && strcmp(sb_event_types[t], type) != 0) t++;
    add(&mine->events[t], 1);
}

void scoreboard_current(const char *id, const char *type) {
    if (!mine) return;
    uint32_t seq = __atomic_load_n(&mine->current_seq, __ATOMIC_RELAXED);
    __atomic_store_n(&mine->current_seq, seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    snprintf(mine->current_id, sizeof mine->current_id, "%s", id ? id : "");
    snprintf(mine->current_type, sizeof mine->current_type, "%s", type ? type : "");
    __atomic_store_n(&mine->current_seq, seq + 2, __ATOMIC_RELEASE);
}

bool sb_current_read(const struct sb_slot *s, char id[ID_LEN + 1], char type[CFG_NAME_MAX]) {
    for (int tries = 0; tries < 3; tries++) {
        uint32_t before = __atomic_load_n(&s->current_seq, __ATOMIC_ACQUIRE);
        if (before & 1) continue;
        memcpy(id, s->current_id, ID_LEN + 1);
        memcpy(type, s->current_type, CFG_NAME_MAX);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&s->current_seq, __ATOMIC_RELAXED) != before) continue;
        id[ID_LEN] = '\0';
        type[CFG_NAME_MAX - 1] = '\0';
        return id[0] != '\0';
    }
    id[0] = type[0] = '\0';
    return false;
}

bool sb_is_worker_of(const struct sb_slot *s, const struct cfg_queue *q) {
    return __atomic_load_n(&s->used, __ATOMIC_ACQUIRE) && s->kind == SB_WORKER && strcmp(s->queue, q->name) == 0;
}

void sb_queue_totals(const struct cfg_queue *q, struct sb_queue_totals *out) {
    memset(out, 0, sizeof *out);
    const struct scoreboard *sb = scoreboard_get();
    for (int k = 0; sb && k < sb->nslots; k++) {
        const struct sb_slot *s = &sb->slot[k];
        if (!sb_is_worker_of(s, q)) continue;
        for (int t = 0; t <= s->ntypes && t < SB_TYPES; t++)
            for (int o = 0; o < SB_NOUTCOMES; o++)
                out->outcomes[o] += __atomic_load_n(&s->counts[t].outcomes[o], __ATOMIC_RELAXED);
        for (int b = 0; b <= SB_LATENCY_BUCKETS; b++) out->latency[b] += __atomic_load_n(&s->latency[b], __ATOMIC_RELAXED);
        out->latency_sum_ms += __atomic_load_n(&s->latency_sum_ms, __ATOMIC_RELAXED);
        out->in_hand += __atomic_load_n(&s->in_hand, __ATOMIC_RELAXED);
    }
}

void sb_queue_lane_oldest(const struct cfg_queue *q, int64_t *out) {
    int n = LANE_CLASSES * q->lanes;
    memset(out, 0, (size_t)n * sizeof *out);
    const struct scoreboard *sb = scoreboard_get();
    for (int k = 0; sb && k < sb->nslots; k++) {
        const struct sb_slot *s = &sb->slot[k];
        if (!sb_is_worker_of(s, q) || !__atomic_load_n(&s->pid, __ATOMIC_RELAXED)) continue;
        for (int i = 0; i < n && i < LANE_CLASSES * LANES_MAX; i++) {
            int64_t ms = __atomic_load_n(&s->lane_oldest_ms[i], __ATOMIC_RELAXED);
            if (ms > 0 && (!out[i] || ms < out[i])) out[i] = ms;
        }
    }
}

bool sb_resident_bytes(pid_t pid, long long *bytes) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/statm", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return false;
    long pages = 0, rss = 0;
    int got = fscanf(f, "%ld %ld", &pages, &rss);
    fclose(f);
    if (got != 2) return false;
    *bytes = (long long)rss * sysconf(_SC_PAGESIZE);
    return true;
}
