/* lane_sorter.c - the sorter of the laned queues on RabbitMQ (docs/contract.md,
 * "Lanes"): while it holds the sorter lock (singleton.c: one active across
 * every pool on every host), it moves each laned RabbitMQ queue's commands
 * from its intake into their lanes (broker_sort_lanes), one broker connection
 * per queue, taking them in turn with short waits. One consumer of an intake
 * at a time, publishing in delivery order with confirms: each lane receives
 * its commands in the intake's order. Forked by the supervisor only when a
 * queue needs it (lane_sorter_needed).
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>

/* Commands moved in one step of one queue (one confirm wait, one ack). */
#define SORT_BATCH 256
/* A step's wait for its first command when the last round moved nothing:
 * split over the queues, so the sorter sleeps in the broker, not spinning. */
#define SORT_IDLE_MS 200
/* How often the active sorter checks that its database session (its lock) lives. */
#define LOCK_CHECK_MS 1000

/* How long the active sorter may fail before it gives up its lock: as the relay's. */
static int give_up_ms(const struct cfg *cfg) { return 2 * cfg->broker_reply_timeout_ms; }

bool lane_sorter_needed(const struct cfg *cfg) {
    for (int i = 0; i < cfg->nqueues; i++)
        if (cfg->queues[i].lanes >= 2 && cfg->queues[i].transport == TRANSPORT_RABBITMQ) return true;
    return false;
}

static enum singleton_end sorter_active(const struct cfg *cfg, struct db *db) {
    struct broker **brokers = xcalloc((size_t)cfg->nqueues, sizeof *brokers);
    int nlaned = 0, failures = 0;
    for (int i = 0; i < cfg->nqueues; i++)
        nlaned += cfg->queues[i].lanes >= 2 && cfg->queues[i].transport == TRANSPORT_RABBITMQ;
    int idle_ms = nlaned ? SORT_IDLE_MS / nlaned : SORT_IDLE_MS;
    if (idle_ms < 10) idle_ms = 10;
    int64_t failing_since = 0, next_check = clock_mono_ms() + LOCK_CHECK_MS;
    bool moved = true;
    char err[512] = "";
    enum singleton_end end = SINGLETON_LOST;
    while (!stop_requested && db_ok(db)) {
        if (clock_mono_ms() >= next_check) { /* the lock is the session's: a dead session frees it */
            next_check = clock_mono_ms() + LOCK_CHECK_MS;
            if (db_cmd(db, "SELECT 1") < 0) break;
        }
        bool moved_now = false, failed = false;
        for (int i = 0; i < cfg->nqueues && !stop_requested; i++) {
            const struct cfg_queue *q = &cfg->queues[i];
            if (q->lanes < 2 || q->transport != TRANSPORT_RABBITMQ) continue;
            int cls = 0;
            if (!brokers[i] && !(brokers[i] = broker_open_class(cfg, TRANSPORT_RABBITMQ, &cls, err, sizeof err))) {
                if (cls == CV_ECONFIG) {
                    log_error("RabbitMQ refused the configuration: %s; the sorter stops", err);
                    end = SINGLETON_CONFIG_REFUSED;
                    goto out;
                }
                failed = true;
                continue;
            }
            int n = broker_sort_lanes(brokers[i], q, SORT_BATCH, moved ? 0 : idle_ms);
            if (n == CV_ECONFIG) {
                log_error("RabbitMQ refused the configuration: %s; the sorter stops", broker_error(brokers[i]));
                end = SINGLETON_CONFIG_REFUSED;
                goto out;
            }
            if (n < 0) { /* nothing acked: RabbitMQ hands the intake's commands out again */
                snprintf(err, sizeof err, "%s: %s", q->name, broker_error(brokers[i]));
                failed = true;
                continue;
            }
            moved_now |= n > 0;
        }
        moved = moved_now;
        if (!failed) {
            if (failures) log_info("the sorter moves commands again");
            failures = 0;
            failing_since = 0;
            continue;
        }
        if (!failing_since) failing_since = clock_mono_ms();
        if (!failures) log_warn("the sorter cannot move commands into their lanes: %s; retrying", err);
        if (clock_mono_ms() - failing_since >= give_up_ms(cfg)) {
            log_warn("the sorter failed for %lld ms (%s): giving up its lock, so that another pool's sorter takes "
                     "over; standing by", (long long)(clock_mono_ms() - failing_since), err);
            end = SINGLETON_GAVE_UP;
            break;
        }
        backoff_sleep(backoff_ms(failures++, 100, 5000), &stop_requested);
    }
out:
    for (int i = 0; i < cfg->nqueues; i++) broker_close(brokers[i]); /* nothing is held unacked between steps */
    free(brokers);
    return end;
}

static const struct singleton sorter_singleton = {
    .name = "sorter",
    .doing = "moving the laned queues' commands from their intakes into their lanes",
    .active = sorter_active,
    .gave_up_wait_ms = give_up_ms,
};

int lane_sorter_run(const struct cfg *cfg) { return singleton_run(cfg, &sorter_singleton); }
