/* subscription_internal.h - what the pieces of a durable subscription share
 * (docs/contract.md section 13); only they include it:
 *
 *   subscription.c           the C API: the events held, per-aggregate order, retries
 *     -> subscription_registry.c  Conveyor's database: the registry, partition
 *                                 ownership (advisory locks), dead letters, the replay
 *
 * The broker's side is core.h's broker_subscription_*. */
#ifndef CONVEYOR_SUBSCRIPTION_INTERNAL_H
#define CONVEYOR_SUBSCRIPTION_INTERNAL_H

#include "core.h"

/* The advisory locks (key1 hashtext('conveyor.sub.' || name), key2 as below)
 * are written into subscription_registry.c's SQL: key2 = the partition, 65535
 * the shared lock every live process holds, 65534 the replay's. */

/* A subscription's row of the registry, as read. */
struct sub_row {
    char transport[16];
    char **patterns;
    int npatterns;
    int partitions;
    char start_from[128];
    bool replaying;                 /* a replay is set and not done */
    int64_t replay_after, replay_end, replay_cursor;
    char replay_published_before[40]; /* timestamptz text, "" when no replay */
    char replay_occurred_after[40];   /* "" when none */
    char replay_xmax[24];             /* the transaction ids before this had ended at creation ("" when none) */
    int64_t created_ms;               /* created_at, ms since the epoch */
};
void sub_row_free(struct sub_row *r);

/* Conveyor's database as a subscription process uses it: one session, which
 * holds the partitions' advisory locks. */
struct sub_registry {
    struct db *db;
    int32_t key1;                    /* hashtext('conveyor.sub.' || name) */
    bool owned[SUBSCRIPTION_PARTITIONS_MAX];
    bool replay_locked;
    char name[80];
    char err[512];
};

/* Connects to url and sets the session up (idle_session_timeout, key1).
 * Returns 0, or a class with the reason in g->err (CV_ECONFIG: a refused login
 * or a database without migration 0014). */
int sub_registry_connect(struct sub_registry *g, const char *url, const char *name);
/* Closes the session (its locks go with it). */
void sub_registry_close(struct sub_registry *g);
/* Reads the row of g->name into *row: 1 found, 0 none, or a class. */
int sub_registry_load(struct sub_registry *g, struct sub_row *row);
/* Inserts the row of a new subscription (nothing if one exists): from is
 * what --from said; for a replay, computes its bounds from the outbox now.
 * Returns 0, or a class: CV_EREFUSED with the reason in g->err for a from the
 * outbox cannot serve (an unknown event id, older than the inbox's window). */
int sub_registry_create(struct sub_registry *g, const char *transport, const char *const *patterns, int npatterns,
                        int partitions, const char *from);
/* Checks from (newest, oldest, RFC 3339 time, UUID): true when valid. */
bool sub_from_valid(const char *from);
/* Every second: keeps the session alive, counts the live processes and
 * takes or gives partitions toward ceil(partitions / processes). want[i] is
 * set for partitions to own (the caller attaches/detaches to match and calls
 * sub_registry_release for one it gave up). Returns 0 or a class (the session
 * is lost: nothing is owned any more). */
int sub_registry_balance(struct sub_registry *g, int partitions, bool want[SUBSCRIPTION_PARTITIONS_MAX]);
/* Gives partition i up (unlocks it). Returns 0 or a class. */
int sub_registry_release(struct sub_registry *g, int i);
/* Tries the replay's lock: 1 held, 0 another process has it, or a class. */
int sub_registry_replay_lock(struct sub_registry *g);
/* The next replayed rows after cursor (at most max; the caller PQclear()s):
 * columns id, payload. Returns 0 or a class. */
int sub_registry_replay_rows(struct sub_registry *g, const struct sub_row *row, int64_t cursor, int max,
                             PGresult **out);
/* Records the replay's progress (cursor), and with done its end. Returns 0 or a class. */
int sub_registry_replay_progress(struct sub_registry *g, int64_t cursor, bool done);
/* Whether every outbox row up to the replay's end is committed or rolled
 * back (no transaction that was running at creation still runs): 1, 0, or a class. */
int sub_registry_replay_visible(struct sub_registry *g, const struct sub_row *row);
/* Whether the replay is complete: no row it must wait for (unpublished rows
 * up to its end while its publish bound is ahead). Returns 1, 0, or a class. */
int sub_registry_replay_complete(struct sub_registry *g, const struct sub_row *row, int64_t cursor);
/* Whether the live event event_id was handed out by the replay (its outbox
 * row meets the replay's bounds). Returns 1, 0, or a class. */
int sub_registry_replayed(struct sub_registry *g, const struct sub_row *row, const char *event_id);
/* Writes the event to the dead letters (or updates its row). Returns 0 or a class. */
int sub_registry_dead(struct sub_registry *g, const char *event_id, const char *json, int attempts,
                      const char *error);
/* Claims up to max dead letters asked to be retried (the caller PQclear()s):
 * columns event_id, event, attempts. Returns 0 or a class. */
int sub_registry_claim_retries(struct sub_registry *g, int max, PGresult **out);
/* A retried dead letter was handled: deletes its row. Returns 0 or a class. */
int sub_registry_retry_done(struct sub_registry *g, const char *event_id);
/* Notes the process is alive (last_seen_at). Returns 0 or a class. */
int sub_registry_seen(struct sub_registry *g);
/* Records a gap (text) the broker reported. Returns 0 or a class. */
int sub_registry_gap(struct sub_registry *g, const char *gap);

#endif
