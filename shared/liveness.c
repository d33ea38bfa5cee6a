/* liveness.c - the worker's progress, one timestamp per process: a broker call
 * (the Redis backend notes it, liveness_progress) or a result on a watched
 * database connection (liveness_watch_db). The Redis heartbeat thread
 * (redis_heartbeat.c) reads it (liveness_progress_at_ms) and stops vouching for
 * a worker that made none for too long. Calls nothing of the brokers. */
#include "core.h"

#include <libpq-events.h>
#include <stdatomic.h>

static _Atomic int64_t progress_at_ms; /* monotonic ms of the worker's last progress (one per process) */

/* The worker made progress: a broker call, or a database result. */
void liveness_progress(void) { atomic_store(&progress_at_ms, clock_mono_ms()); }

/* The last progress noted, 0 if none yet (core.h). */
int64_t liveness_progress_at_ms(void) { return atomic_load(&progress_at_ms); }

/* libpq event procedure: every result created on the watched connection is progress. */
static int on_db_event(PGEventId id, void *info, void *pass) {
    (void)info;
    (void)pass;
    if (id == PGEVT_RESULTCREATE) liveness_progress();
    return 1;
}

/* Registers on_db_event on db; a failure is logged, not returned (core.h). */
void liveness_watch_db(PGconn *db) {
    if (db && !PQregisterEventProc(db, on_db_event, "conveyor-liveness", NULL))
        log_warn("cannot watch the database connection for progress: its statements do not count as progress");
}
