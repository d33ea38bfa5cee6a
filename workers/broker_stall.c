/* broker_stall.c - a broker that does not answer, seen from the pool: each
 * child notes in its scoreboard slot when it waits for a reply it is owed,
 * when one came, and when a bound fired on a silent broker (broker_note in
 * the backends); the HTTP listener reads the slots for /readyz (check
 * broker_stall) and /metrics (conveyor_broker_stalled). Nothing here waits.
 */
#include "workers.h"

#include <stdio.h>

/* The slot of this process (scoreboard_attach), or NULL. */
static struct sb_slot *my_slot;

/* broker_stall_fn: writes the note into my_slot. */
static void on_note(enum broker_note note, int budget_ms) {
    if (!my_slot) return;
    int64_t now = clock_mono_ms();
    switch (note) {
    case BROKER_WAITING:
        __atomic_store_n(&my_slot->broker_wait_until_ms, now + budget_ms + STALL_GRACE_MS, __ATOMIC_RELAXED);
        break;
    case BROKER_ANSWERED:
        __atomic_store_n(&my_slot->broker_wait_until_ms, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&my_slot->broker_answer_ms, now, __ATOMIC_RELAXED);
        break;
    case BROKER_SILENT:
        __atomic_store_n(&my_slot->broker_wait_until_ms, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&my_slot->broker_silent_ms, now, __ATOMIC_RELAXED);
        __atomic_add_fetch(&my_slot->broker_silences, 1, __ATOMIC_RELAXED);
        break;
    case BROKER_IDLE: /* a closed connection owes nothing; a silence stays shown until it ages out */
        __atomic_store_n(&my_slot->broker_wait_until_ms, 0, __ATOMIC_RELAXED);
        break;
    }
}

void broker_stall_attach(struct sb_slot *slot) {
    my_slot = slot;
    if (slot) { /* a new process in the slot: its broker has not stalled yet */
        __atomic_store_n(&slot->broker_wait_until_ms, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&slot->broker_silent_ms, 0, __ATOMIC_RELAXED);
    }
    broker_stall_hook(slot ? on_note : NULL);
}

/* The transport slot s uses, and a name for it ("relay"); false for a slot of no broker. */
static bool slot_transport(const struct cfg *cfg, const struct sb_slot *s, enum transport *t, char *name, size_t n) {
    switch (s->kind) {
    case SB_RELAY:
        *t = cfg->events_transport;
        snprintf(name, n, "relay");
        return true;
    case SB_REAPER:
        *t = TRANSPORT_REDIS;
        snprintf(name, n, "reaper");
        return true;
    case SB_WORKER: {
        const struct cfg_queue *q = cfg_queue_named(cfg, s->queue);
        if (!q) return false;
        *t = q->transport;
        snprintf(name, n, "worker of %s", q->name);
        return true;
    }
    default: return false;
    }
}

int broker_stalled_count(const struct cfg *cfg, enum transport t, char *who, size_t n) {
    const struct scoreboard *sb = scoreboard_get();
    int64_t now = clock_mono_ms();
    int count = 0;
    if (who && n) who[0] = '\0';
    for (int k = 0; sb && k < sb->nslots; k++) {
        const struct sb_slot *s = &sb->slot[k];
        enum transport st;
        char name[CFG_NAME_MAX + 16];
        if (!__atomic_load_n(&s->used, __ATOMIC_ACQUIRE) || !__atomic_load_n(&s->pid, __ATOMIC_RELAXED) ||
            !slot_transport(cfg, s, &st, name, sizeof name) || st != t)
            continue;
        int64_t until = __atomic_load_n(&s->broker_wait_until_ms, __ATOMIC_RELAXED);
        int64_t silent = __atomic_load_n(&s->broker_silent_ms, __ATOMIC_RELAXED);
        int64_t answer = __atomic_load_n(&s->broker_answer_ms, __ATOMIC_RELAXED);
        bool overdue = until && now > until;
        bool was_silent = silent && (now - silent < STALL_SHOW_MS ||
                                     (silent >= answer && now - silent < 2L * cfg->broker_reply_timeout_ms));
        if (!overdue && !was_silent) continue;
        if (count++ == 0 && who && n) snprintf(who, n, "%s", name);
    }
    return count;
}

uint64_t broker_silences_total(const struct cfg *cfg, enum transport t) {
    const struct scoreboard *sb = scoreboard_get();
    uint64_t total = 0;
    for (int k = 0; sb && k < sb->nslots; k++) {
        const struct sb_slot *s = &sb->slot[k];
        enum transport st;
        char name[CFG_NAME_MAX + 16];
        if (__atomic_load_n(&s->used, __ATOMIC_ACQUIRE) && slot_transport(cfg, s, &st, name, sizeof name) && st == t)
            total += __atomic_load_n(&s->broker_silences, __ATOMIC_RELAXED);
    }
    return total;
}
