/* reaper.c - Redis housekeeping: every half second, moves due retries from
 * conveyor:retry:<queue> back to their queue, and returns the in-flight
 * messages of workers whose heartbeat key expired. Every pool with a Redis
 * queue runs one; they may run side by side (each move is one Lua script).
 */
#include "workers.h"

#define REAP_EVERY_MS 500

int reaper_run(const struct cfg *cfg) {
    struct broker *b = NULL;
    char err[512];
    int failures = 0;
    log_info("reaper started: heartbeat expiry %d s", cfg->heartbeat_ttl_s);
    while (!stop_requested) {
        if (!b && !(b = broker_open_wait(cfg, TRANSPORT_REDIS, &stop_requested, err, sizeof err))) {
            if (!err[0]) break; /* stopped */
            log_error("redis refused the configuration: %s; stopping", err);
            return CV_EXIT_CONFIG;
        }
        int moved = broker_maintain(b);
        if (moved < 0) {
            if (failures == 0) log_warn("redis housekeeping failed, retrying: %s", broker_error(b));
            backoff_sleep(backoff_ms(failures++, 100, 5000), &stop_requested);
            continue;
        }
        if (failures) log_info("redis is back");
        failures = 0;
        if (moved == 0) backoff_sleep(REAP_EVERY_MS, &stop_requested);
    }
    broker_close(b);
    log_info("reaper stopped");
    return 0;
}
