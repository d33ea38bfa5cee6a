/* singleton.c - a process of which one is active across every pool on every
 * host: the holder of a session advisory lock named "<prefix>.<name>". The
 * others stand by on their own connection and try the lock every second; when
 * the holder dies or its host is cut off, PostgreSQL ends its session and
 * frees the lock, and one of them takes over. The relay (relay.c), the
 * timekeeper (timekeeper.c) and the sorter (lane_sorter.c) are such processes;
 * so is a producer's forwarder (forwarder.c), whose lock lives in the
 * producer's database.
 */
#include "workers.h"

#include <stdio.h>

/* The server drops a singleton's session (and its lock) when its host stops
 * answering: keepalive probes after 2 s idle, 1 s apart, 2 unanswered; data
 * unacknowledged for 4 s (docs/scaling.md). */
#define SINGLETON_SESSION_LIVENESS                                                                        \
    "SELECT set_config('tcp_keepalives_idle', '2', false), set_config('tcp_keepalives_interval', '1', false), " \
    "set_config('tcp_keepalives_count', '2', false), set_config('tcp_user_timeout', '4000', false)"

int singleton_run(const struct cfg *cfg, const struct singleton *s) {
    char lock_name[128];
    snprintf(lock_name, sizeof lock_name, "%s.%s", cfg->prefix, s->name);
    return singleton_run_at(cfg, s, cfg->database_url, lock_name);
}

int singleton_run_at(const struct cfg *cfg, const struct singleton *s, const char *url, const char *lock_name) {
    const char *p[1] = {lock_name};
    bool said_standby = false;
    enum singleton_end end = SINGLETON_LOST;
    while (!stop_requested && end != SINGLETON_CONFIG_REFUSED) {
        struct db *db = db_connect_retry(url, &stop_requested);
        if (!db) {
            if (!stop_requested) end = SINGLETON_CONFIG_REFUSED; /* said by db_connect_retry */
            break;
        }
        end = SINGLETON_LOST;
        if (db_cmd(db, SINGLETON_SESSION_LIVENESS) < 0)
            log_warn("%s: keepalive settings not taken: %s", s->name, db_errstr(db));
        while (!stop_requested && db_ok(db)) {
            PGresult *r;
            if (db_exec(db, "SELECT pg_try_advisory_lock(hashtext($1))", 1, p, &r) < 0) break;
            bool got = PQgetvalue(r, 0, 0)[0] == 't';
            PQclear(r);
            if (got) {
                log_info("%s active: %s", s->name, s->doing);
                said_standby = false;
                end = s->active(cfg, db);
                break;
            }
            if (!said_standby) log_info("another %s is active; standing by", s->name);
            said_standby = true;
            if (s->standing_by) s->standing_by(cfg, db);
            backoff_sleep(1000, &stop_requested);
        }
        if (stop_requested && db_ok(db) && s->stopping) s->stopping(db);
        db_close(db); /* releases the lock if held */
        if (end == SINGLETON_GAVE_UP) /* another pool's process may take the lock meanwhile */
            backoff_sleep(s->gave_up_wait_ms(cfg), &stop_requested);
    }
    log_info("%s stopped", s->name);
    return end == SINGLETON_CONFIG_REFUSED ? CV_EXIT_CONFIG : 0;
}
