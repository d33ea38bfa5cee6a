/* timekeeper.c - the process that keeps time for every pool: while it holds
 * the timekeeper lock (singleton.c: one active across every pool on every
 * host), it publishes parked commands that are due back to their queues
 * (parking.c), fires the schedules' slots (schedule_fire.c) and, once a
 * minute, prunes the idle buckets of keyed rate limits (rate_limit_buckets.c). Time is the
 * database's clock: every host judges by the same one.
 */
#include "workers.h"

#include <stdio.h>

/* How often the active timekeeper looks for due rows when none is waiting: a
 * command is published at most this long after its time (plus one pass), and
 * each look is one index probe of parked_commands_due. */
#define TIMEKEEPER_POLL_MS 200
/* How often idle rate-limit buckets are pruned. */
#define PRUNE_MS 60000
/* Rows claimed, published and deleted in one transaction. */
#define RELEASE_BATCH 500

/* How long the active timekeeper may fail to publish due commands before it
 * gives up the lock to a pool whose brokers answer: as the relay's. */
static int give_up_ms(const struct cfg *cfg) { return 2 * cfg->broker_reply_timeout_ms; }

static enum singleton_end timekeeper_active(const struct cfg *cfg, struct db *db) {
    struct broker *brokers[2] = {NULL, NULL};
    char err[512];
    int failures = 0;
    int64_t failing_since = 0;
    bool holding_back = false; /* a full queue refused due parked commands (logged once) */
    enum singleton_end end = SINGLETON_LOST;
    struct schedule_firing firing;
    schedule_firing_init(&firing, cfg);
    int64_t next_prune = clock_mono_ms() + PRUNE_MS;
    while (!stop_requested && db_ok(db)) {
        if (clock_mono_ms() >= next_prune) { /* a failure is logged; tried again in a minute */
            next_prune = clock_mono_ms() + PRUNE_MS;
            (void)rate_limit_prune(db, cfg);
        }
        int fired = schedule_fire_due(db, cfg, &firing); /* parks what is due: released just below */
        if (fired < 0 && !db_ok(db)) break;
        int n = parking_release(db, cfg, brokers, RELEASE_BATCH, err, sizeof err);
        if (n == CV_ECONFIG) {
            log_error("a broker refused the configuration: %s; the timekeeper stops", err);
            end = SINGLETON_CONFIG_REFUSED;
            break;
        }
        if (n == CV_EFULL) { /* not a failure: the rows stay parked until the queue has room */
            if (!holding_back) log_info("a full queue holds back due parked commands (%s); they stay parked", err);
            holding_back = true;
            backoff_sleep(TIMEKEEPER_POLL_MS, &stop_requested);
            continue;
        }
        if (holding_back) log_info("due parked commands go to their queues again");
        holding_back = false;
        if (n < 0) {
            if (!db_ok(db)) break;
            if (!failing_since) failing_since = clock_mono_ms();
            if (!failures) log_warn("cannot publish due parked commands: %s; retrying", err);
            if (clock_mono_ms() - failing_since >= give_up_ms(cfg)) {
                log_warn("the timekeeper could not publish for %lld ms (%s): giving up its lock, so that another "
                         "pool's timekeeper takes over; standing by",
                         (long long)(clock_mono_ms() - failing_since), err);
                end = SINGLETON_GAVE_UP;
                break;
            }
            backoff_sleep(backoff_ms(failures++, 100, 5000), &stop_requested);
            continue;
        }
        if (failures) log_info("timekeeper publishing again");
        failures = 0;
        failing_since = 0;
        if (n > 0) log_debug("published %d due parked command%s", n, n == 1 ? "" : "s");
        if (n == RELEASE_BATCH) continue;
        backoff_sleep(TIMEKEEPER_POLL_MS, &stop_requested);
    }
    schedule_firing_free(&firing);
    for (int t = 0; t < 2; t++) broker_close(brokers[t]);
    return end;
}

static const struct singleton timekeeper_singleton = {
    .name = "timekeeper",
    .doing = "publishing due parked commands and firing schedules",
    .active = timekeeper_active,
    .gave_up_wait_ms = give_up_ms,
};

int timekeeper_run(const struct cfg *cfg) { return singleton_run(cfg, &timekeeper_singleton); }
