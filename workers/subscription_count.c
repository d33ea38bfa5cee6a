/* subscription_count.c - the pools' count of the durable subscriptions
 * (docs/contract.md section 13, "Lag"): every registered subscription of a
 * transport the pool has a broker for is counted on its broker
 * (broker_subscription_counts) and the figures written to its registry row
 * (lag, oldest_age_seconds, counted_at, empty_seen_at, gap), which /metrics,
 * /api/subscriptions and the dashboard read (subscription_view.c). The HTTP
 * child of each pool with http.listen runs it with its broker sample (every
 * 5 s); several pools counting is harmless: each writes what it saw.
 *
 * RabbitMQ cannot tell a message's age without taking it: a count that finds
 * the queues empty sets empty_seen_at = now(), and while they hold messages
 * the oldest's age is at most now() - empty_seen_at (the subscription's
 * creation when they were never seen empty). Redis's counts give the age.
 * A gap once seen stays noted (gap) until the subscription is removed.
 */
#include "workers.h"

#include <stdio.h>
#include <stdlib.h>

int subscription_count_write(struct db *db, const char *name, enum transport t, const struct subscription_counts *c) {
    char lag[32], age[40];
    snprintf(lag, sizeof lag, "%ld", c->lag);
    snprintf(age, sizeof age, "%.3f", c->oldest_age_s < 0 ? 0 : c->oldest_age_s);
    const char *p[5] = {name, lag, t == TRANSPORT_RABBITMQ ? "t" : "f", age, c->gap ? "t" : "f"};
    return db_exec(db,
                   "UPDATE subscriptions SET lag = $2::bigint, counted_at = now(), "
                   "empty_seen_at = CASE WHEN $3::boolean AND $2::bigint = 0 THEN now() ELSE empty_seen_at END, "
                   "oldest_age_seconds = CASE WHEN $2::bigint = 0 THEN 0 "
                   "WHEN $3::boolean THEN extract(epoch FROM now() - coalesce(empty_seen_at, created_at)) "
                   "ELSE $4::double precision END, "
                   "gap = CASE WHEN $5::boolean THEN coalesce(gap, 'the stream was trimmed (or entries deleted) past "
                   "entries a partition had not read; seen by a pool''s count at ' || "
                   "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')) ELSE gap END "
                   "WHERE name = $1",
                   5, p, NULL);
}

int subscription_count_all(struct db *db, struct broker *const brokers[2], bool failed[2]) {
    failed[0] = failed[1] = false;
    struct subscription_row *rows;
    int n, counted = 0;
    int rc = subscription_rows_read(db, NULL, &rows, &n);
    if (rc < 0) return rc;
    for (int i = 0; i < n; i++) {
        enum transport t;
        struct subscription_spec spec;
        if (!subscription_row_spec(&rows[i], &t, &spec) || !brokers[t] || failed[t]) continue;
        struct subscription_counts c;
        if (broker_subscription_counts(brokers[t], &spec, &c) < 0) {
            log_debug("subscription %s not counted: %s", rows[i].name, broker_error(brokers[t]));
            failed[t] = true;
            continue;
        }
        if ((rc = subscription_count_write(db, rows[i].name, t, &c)) < 0) break;
        counted++;
    }
    subscription_rows_free(rows, n);
    return rc < 0 ? rc : counted;
}
