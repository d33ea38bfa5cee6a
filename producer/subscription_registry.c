/* subscription_registry.c - a durable subscription in Conveyor's database
 * (docs/contract.md section 13): its row of the registry (subscriptions),
 * the ownership of its partitions (advisory locks held by this session), its
 * dead letters (subscription_dead), and the replay from the outbox. Called by
 * subscription.c; calls db.c. Every function returns 0 (or its count) or an
 * error class, with the reason in g->err. */
#include "subscription_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Copies the database's last error into g->err and returns rc. */
static int failed(struct sub_registry *g, int rc, const char *what) {
    snprintf(g->err, sizeof g->err, "%s: %s", what, g->db ? db_errstr(g->db) : "no connection");
    return rc;
}

void sub_row_free(struct sub_row *r) {
    for (int i = 0; i < r->npatterns; i++) free(r->patterns[i]);
    free(r->patterns);
    memset(r, 0, sizeof *r);
}

int sub_registry_connect(struct sub_registry *g, const char *url, const char *name) {
    int cls = CV_ERETRY;
    snprintf(g->name, sizeof g->name, "%s", name);
    memset(g->owned, 0, sizeof g->owned);
    g->replay_locked = false;
    g->db = db_connect_class(url, &cls, g->err, sizeof g->err);
    if (!g->db) return cls;
    /* a process that hangs loses its session, and its partitions, after 60 s
     * without a statement (it runs one every second while it runs) */
    int rc = db_cmd(g->db, "SET idle_session_timeout = '60s'; SET application_name = 'conveyor-subscription'");
    if (rc < 0) return failed(g, rc, "setting the session up");
    const char *p[1] = {name};
    PGresult *r;
    rc = db_exec(g->db,
                 "SELECT hashtext('conveyor.sub.' || $1), to_regclass('subscriptions') IS NOT NULL, "
                 "pg_advisory_lock_shared(hashtext('conveyor.sub.' || $1), 65535)",
                 1, p, &r);
    if (rc < 0) return failed(g, rc, "reading the subscription's lock key");
    g->key1 = (int32_t)strtol(PQgetvalue(r, 0, 0), NULL, 10);
    bool has_table = PQgetvalue(r, 0, 1)[0] == 't';
    PQclear(r);
    if (!has_table) {
        snprintf(g->err, sizeof g->err,
                 "Conveyor's database has no subscriptions table: start conveyor-workers once (it migrates the "
                 "database to migration 0014) or run conveyor-admin migrate");
        return CV_ECONFIG;
    }
    return 0;
}

void sub_registry_close(struct sub_registry *g) {
    if (g->db) db_close(g->db);
    g->db = NULL;
    memset(g->owned, 0, sizeof g->owned);
    g->replay_locked = false;
}

/* The elements of a text[] literal {a,b} into *out (topic patterns: no
 * quotes or commas inside). Returns the count. */
static int parse_text_array(const char *s, char ***out) {
    int n = 0, cap = 4;
    char **v = xcalloc((size_t)cap, sizeof *v);
    const char *p = s && *s == '{' ? s + 1 : s ? s : "";
    while (*p && *p != '}') {
        bool quoted = *p == '"';
        if (quoted) p++;
        const char *e = p;
        while (*e && (quoted ? *e != '"' : (*e != ',' && *e != '}'))) e++;
        if (n == cap) v = xrealloc(v, (size_t)(cap *= 2) * sizeof *v);
        v[n++] = xstrndup(p, (size_t)(e - p));
        p = e + (quoted && *e);
        if (*p == ',') p++;
    }
    *out = v;
    return n;
}

int sub_registry_load(struct sub_registry *g, struct sub_row *row) {
    const char *p[1] = {g->name};
    PGresult *r;
    int rc = db_exec(g->db,
                     "SELECT transport, patterns::text, partitions, start_from, "
                     "replay_after IS NOT NULL AND replay_done_at IS NULL, coalesce(replay_after, 0), "
                     "coalesce(replay_end, 0), coalesce(replay_cursor, 0), coalesce(replay_published_before::text, ''), "
                     "coalesce(replay_occurred_after::text, ''), (extract(epoch FROM created_at) * 1000)::bigint, "
                     "coalesce(replay_xmax::text, '') "
                     "FROM subscriptions WHERE name = $1",
                     1, p, &r);
    if (rc < 0) return failed(g, rc, "reading the subscription's row");
    if (PQntuples(r) == 0) {
        PQclear(r);
        return 0;
    }
    memset(row, 0, sizeof *row);
    snprintf(row->transport, sizeof row->transport, "%s", PQgetvalue(r, 0, 0));
    row->npatterns = parse_text_array(PQgetvalue(r, 0, 1), &row->patterns);
    row->partitions = atoi(PQgetvalue(r, 0, 2));
    snprintf(row->start_from, sizeof row->start_from, "%s", PQgetvalue(r, 0, 3));
    row->replaying = PQgetvalue(r, 0, 4)[0] == 't';
    row->replay_after = strtoll(PQgetvalue(r, 0, 5), NULL, 10);
    row->replay_end = strtoll(PQgetvalue(r, 0, 6), NULL, 10);
    row->replay_cursor = strtoll(PQgetvalue(r, 0, 7), NULL, 10);
    snprintf(row->replay_published_before, sizeof row->replay_published_before, "%s", PQgetvalue(r, 0, 8));
    snprintf(row->replay_occurred_after, sizeof row->replay_occurred_after, "%s", PQgetvalue(r, 0, 9));
    row->created_ms = strtoll(PQgetvalue(r, 0, 10), NULL, 10);
    snprintf(row->replay_xmax, sizeof row->replay_xmax, "%s", PQgetvalue(r, 0, 11));
    PQclear(r);
    return 1;
}

static bool is_uuid(const char *s) {
    char id[ID_LEN + 1];
    return id_parse(s, id);
}

bool sub_from_valid(const char *from) {
    return strcmp(from, "newest") == 0 || strcmp(from, "oldest") == 0 || clock_rfc3339_valid(from) || is_uuid(from);
}

int sub_registry_create(struct sub_registry *g, const char *transport, const char *const *patterns, int npatterns,
                        int partitions, const char *from) {
    char *arr = db_array(patterns, npatterns);
    if (!arr) {
        snprintf(g->err, sizeof g->err, "out of memory");
        return CV_ERETRY;
    }
    char parts[16];
    snprintf(parts, sizeof parts, "%d", partitions);
    const char *p[5] = {g->name, transport, arr, parts, from};
    PGresult *r;
    int rc;
    if (is_uuid(from)) {
        const char *q[1] = {from};
        if ((rc = db_exec(g->db, "SELECT 1 FROM outbox WHERE event_id = $1::uuid", 1, q, &r)) < 0) {
            free(arr);
            return failed(g, rc, "looking the --from event up in the outbox");
        }
        int found = PQntuples(r);
        PQclear(r);
        if (!found) {
            snprintf(g->err, sizeof g->err,
                     "--from %s: no such event in the outbox (pruned after relay.retention_seconds, or never "
                     "published)",
                     from);
            free(arr);
            return CV_EREFUSED;
        }
    }
    /* the replay's bounds (section 13): rows after the start up to the
     * outbox's last one now, published before a minute from now (what the
     * broker had before the subscription's queues or groups existed, with a
     * margin for the relay's mark after the broker's confirm) */
    rc = db_exec(g->db,
                 "WITH start AS ("
                 "  SELECT CASE WHEN $5 = 'newest' THEN NULL::bigint WHEN $5 ~* '^[0-9a-f]{8}-' "
                 "    THEN (SELECT id FROM outbox WHERE event_id = $5::uuid) ELSE 0::bigint END AS after, "
                 "  CASE WHEN $5 = 'oldest' THEN now() - interval '30 days' "
                 "    WHEN $5 = 'newest' OR $5 ~* '^[0-9a-f]{8}-' THEN NULL::timestamptz "
                 "    ELSE $5::timestamptz END AS occurred_after, "
                 "  CASE WHEN $5 ~* '^[0-9a-f]{8}-' THEN (SELECT created_at FROM outbox WHERE event_id = $5::uuid) "
                 "    WHEN $5 IN ('newest', 'oldest') THEN NULL ELSE $5::timestamptz END AS since) "
                 "INSERT INTO subscriptions (name, transport, patterns, partitions, start_from, replay_after, replay_end, "
                 "  replay_published_before, replay_occurred_after, replay_cursor, replay_xmax) "
                 "SELECT $1, $2, $3::text[], $4::int, $5, after, "
                 "  CASE WHEN after IS NULL THEN NULL ELSE (SELECT coalesce(max(id), 0) FROM outbox) END, "
                 "  CASE WHEN after IS NULL THEN NULL ELSE now() + interval '60 seconds' END, occurred_after, after, "
                 "  CASE WHEN after IS NULL THEN NULL ELSE pg_snapshot_xmax(pg_current_snapshot()) END "
                 "FROM start WHERE coalesce(since, now()) >= now() - interval '30 days' "
                 "ON CONFLICT (name) DO NOTHING RETURNING 1",
                 5, p, &r);
    free(arr);
    if (rc < 0) return failed(g, rc, "registering the subscription");
    int n = PQntuples(r);
    PQclear(r);
    if (n == 0) { /* refused by the window, or another process created it first */
        struct sub_row row;
        int found = sub_registry_load(g, &row);
        if (found < 0) return found;
        if (found) {
            sub_row_free(&row);
            return 0;
        }
        snprintf(g->err, sizeof g->err,
                 "--from %s reaches back more than 30 days, the subscriber's inbox window (conveyor.inbox_window()): "
                 "a replay that far could apply events twice",
                 from);
        return CV_EREFUSED;
    }
    return 0;
}

int sub_registry_balance(struct sub_registry *g, int partitions, bool want[SUBSCRIPTION_PARTITIONS_MAX]) {
    char k1[16];
    snprintf(k1, sizeof k1, "%d", (int)g->key1);
    const char *p[1] = {k1};
    PGresult *r;
    int rc = db_exec(g->db,
                     "SELECT count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                     "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                     "AND classid::bigint = ($1::bigint & 4294967295) AND objid = 65535 AND objsubid = 2",
                     1, p, &r);
    if (rc < 0) {
        memset(g->owned, 0, sizeof g->owned);
        return failed(g, rc, "counting the subscription's processes");
    }
    int members = atoi(PQgetvalue(r, 0, 0));
    PQclear(r);
    if (members < 1) members = 1;
    int share = (partitions + members - 1) / members, owned = 0;
    for (int i = 0; i < partitions; i++) owned += g->owned[i];
    for (int i = 0; i < SUBSCRIPTION_PARTITIONS_MAX; i++) want[i] = i < partitions && g->owned[i];
    /* over the share: give the highest up (the caller drains them first) */
    for (int i = partitions - 1; i >= 0 && owned > share; i--)
        if (want[i]) want[i] = false, owned--;
    /* under it: try the free ones, from a place of our own so that processes do not all try the same */
    int start = (int)(getpid() % (partitions ? partitions : 1));
    for (int k = 0; k < partitions && owned < share; k++) {
        int i = (start + k) % partitions;
        if (g->owned[i]) continue;
        char ki[16];
        snprintf(ki, sizeof ki, "%d", i);
        const char *q[2] = {k1, ki};
        if ((rc = db_exec(g->db, "SELECT pg_try_advisory_lock($1::int, $2::int)", 2, q, &r)) < 0) {
            memset(g->owned, 0, sizeof g->owned);
            return failed(g, rc, "taking a partition");
        }
        if (PQgetvalue(r, 0, 0)[0] == 't') g->owned[i] = want[i] = true, owned++;
        PQclear(r);
    }
    return 0;
}

int sub_registry_release(struct sub_registry *g, int i) {
    if (i < 0 || i >= SUBSCRIPTION_PARTITIONS_MAX || !g->owned[i]) return 0;
    char k1[16], ki[16];
    snprintf(k1, sizeof k1, "%d", (int)g->key1);
    snprintf(ki, sizeof ki, "%d", i);
    const char *q[2] = {k1, ki};
    int rc = db_exec(g->db, "SELECT pg_advisory_unlock($1::int, $2::int)", 2, q, NULL);
    if (rc < 0) {
        memset(g->owned, 0, sizeof g->owned);
        return failed(g, rc, "giving a partition up");
    }
    g->owned[i] = false;
    return 0;
}

int sub_registry_replay_lock(struct sub_registry *g) {
    if (g->replay_locked) return 1;
    char k1[16];
    snprintf(k1, sizeof k1, "%d", (int)g->key1);
    const char *q[1] = {k1};
    PGresult *r;
    int rc = db_exec(g->db, "SELECT pg_try_advisory_lock($1::int, 65534)", 1, q, &r);
    if (rc < 0) return failed(g, rc, "taking the replay's lock");
    g->replay_locked = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    return g->replay_locked;
}

/* The replay's bounds as parameters $1.. $4 from cursor: cursor, end, published before, occurred after. */
static void replay_params(const struct sub_row *row, int64_t cursor, char c[24], char e[24], const char *p[4]) {
    snprintf(c, 24, "%lld", (long long)cursor);
    snprintf(e, 24, "%lld", (long long)row->replay_end);
    p[0] = c;
    p[1] = e;
    p[2] = row->replay_published_before;
    p[3] = row->replay_occurred_after[0] ? row->replay_occurred_after : NULL;
}

#define REPLAY_WHERE                                                                                              \
    "id > $1::bigint AND id <= $2::bigint AND published_at < $3::timestamptz "                                    \
    "AND ($4::timestamptz IS NULL OR (payload->>'occurredAt')::timestamptz > $4::timestamptz)"

int sub_registry_replay_rows(struct sub_registry *g, const struct sub_row *row, int64_t cursor, int max,
                             PGresult **out) {
    char c[24], e[24], m[16];
    const char *p[5];
    replay_params(row, cursor, c, e, p);
    snprintf(m, sizeof m, "%d", max);
    p[4] = m;
    /* not past a row of its range the relay has not marked yet while the
     * publish bound is ahead: it may fall in the bounds once marked */
    int rc = db_exec(g->db,
                     "SELECT id, payload::text FROM outbox WHERE " REPLAY_WHERE " AND id < coalesce(("
                     "SELECT min(id) FROM outbox WHERE id > $1::bigint AND id <= $2::bigint AND published_at IS NULL "
                     "AND now() < $3::timestamptz), $2::bigint + 1) ORDER BY id LIMIT $5::int",
                     5, p, out);
    return rc < 0 ? failed(g, rc, "reading the outbox for the replay") : 0;
}

int sub_registry_replay_progress(struct sub_registry *g, int64_t cursor, bool done) {
    char c[24];
    snprintf(c, sizeof c, "%lld", (long long)cursor);
    const char *p[3] = {g->name, c, done ? "t" : "f"};
    int rc = db_exec(g->db,
                     "UPDATE subscriptions SET replay_cursor = greatest(coalesce(replay_cursor, 0), $2::bigint), "
                     "replay_done_at = CASE WHEN $3::boolean THEN now() ELSE replay_done_at END WHERE name = $1",
                     3, p, NULL);
    return rc < 0 ? failed(g, rc, "recording the replay's progress") : 0;
}

int sub_registry_replay_visible(struct sub_registry *g, const struct sub_row *row) {
    if (!row->replay_xmax[0]) return 1;
    const char *p[1] = {row->replay_xmax};
    PGresult *r;
    int rc = db_exec(g->db, "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::xid8", 1, p, &r);
    if (rc < 0) return failed(g, rc, "waiting for the transactions before the replay");
    int yes = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    return yes;
}

int sub_registry_replay_complete(struct sub_registry *g, const struct sub_row *row, int64_t cursor) {
    char c[24], e[24];
    const char *p[4];
    replay_params(row, cursor, c, e, p);
    PGresult *r;
    /* nothing left to replay: no row in its bounds, and none unpublished that may still fall in them */
    int rc = db_exec(g->db,
                     "SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE id > $1::bigint AND id <= $2::bigint "
                     "AND (published_at < $3::timestamptz OR (published_at IS NULL AND now() < $3::timestamptz)) "
                     "AND ($4::timestamptz IS NULL OR (payload->>'occurredAt')::timestamptz > $4::timestamptz))",
                     4, p, &r);
    if (rc < 0) return failed(g, rc, "checking the replay's end");
    int done = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    return done;
}

int sub_registry_replayed(struct sub_registry *g, const struct sub_row *row, const char *event_id) {
    char c[24], e[24];
    const char *p[5];
    replay_params(row, row->replay_after, c, e, p);
    p[4] = event_id;
    PGresult *r;
    int rc = db_exec(g->db, "SELECT EXISTS (SELECT 1 FROM outbox WHERE event_id = $5::uuid AND " REPLAY_WHERE ")", 5,
                     p, &r);
    if (rc < 0) return failed(g, rc, "checking an event against the replay");
    int yes = PQgetvalue(r, 0, 0)[0] == 't';
    PQclear(r);
    return yes;
}

int sub_registry_dead(struct sub_registry *g, const char *event_id, const char *json, int attempts,
                      const char *error) {
    char a[16];
    snprintf(a, sizeof a, "%d", attempts);
    const char *p[5] = {g->name, event_id, json, a, error && *error ? error : "failed"};
    int rc = db_exec(g->db,
                     "INSERT INTO subscription_dead (subscription, event_id, event, attempts, error) "
                     "VALUES ($1, $2::uuid, $3, $4::int, $5) ON CONFLICT (subscription, event_id) DO UPDATE "
                     "SET event = EXCLUDED.event, attempts = subscription_dead.attempts + EXCLUDED.attempts, "
                     "error = EXCLUDED.error, dead_at = now(), retry_requested_at = NULL, claimed_until = NULL",
                     5, p, NULL);
    return rc < 0 ? failed(g, rc, "writing a dead letter") : 0;
}

int sub_registry_claim_retries(struct sub_registry *g, int max, PGresult **out) {
    char m[16];
    snprintf(m, sizeof m, "%d", max);
    const char *p[2] = {g->name, m};
    int rc = db_exec(g->db,
                     "UPDATE subscription_dead d SET claimed_until = now() + interval '5 minutes' "
                     "FROM (SELECT event_id FROM subscription_dead WHERE subscription = $1 "
                     "  AND retry_requested_at IS NOT NULL AND (claimed_until IS NULL OR claimed_until < now()) "
                     "  ORDER BY dead_at LIMIT $2::int FOR UPDATE SKIP LOCKED) c "
                     "WHERE d.subscription = $1 AND d.event_id = c.event_id RETURNING d.event_id::text, d.event",
                     2, p, out);
    return rc < 0 ? failed(g, rc, "claiming dead letters to retry") : 0;
}

int sub_registry_retry_done(struct sub_registry *g, const char *event_id) {
    const char *p[2] = {g->name, event_id};
    int rc = db_exec(g->db, "DELETE FROM subscription_dead WHERE subscription = $1 AND event_id = $2::uuid", 2, p,
                     NULL);
    return rc < 0 ? failed(g, rc, "deleting a retried dead letter") : 0;
}

int sub_registry_seen(struct sub_registry *g) {
    const char *p[1] = {g->name};
    int rc = db_exec(g->db, "UPDATE subscriptions SET last_seen_at = now() WHERE name = $1", 1, p, NULL);
    return rc < 0 ? failed(g, rc, "noting the subscription alive") : 0;
}

int sub_registry_gap(struct sub_registry *g, const char *gap) {
    const char *p[2] = {g->name, gap};
    int rc = db_exec(g->db, "UPDATE subscriptions SET gap = $2 WHERE name = $1 AND gap IS DISTINCT FROM $2", 2, p,
                     NULL);
    return rc < 0 ? failed(g, rc, "recording a gap") : 0;
}
