/* test_schedule_zone.c - a cron schedule's slots against the real tz data of
 * PostgreSQL (issue 23): the spring-forward wall time that does not exist, the
 * fall-back wall time that happens twice, and the slot's text with its offset,
 * whatever the session's TimeZone. Needs the database: CONVEYOR_DATABASE_URL
 * (eval "$(scripts/servers.sh env)"); without it every case FAILS. */
#include "core.h"
#include "test.h"

#include <time.h>

static int64_t wall(int y, int mo, int d, int h, int mi, int s) {
    struct tm tm = {.tm_year = y - 1900, .tm_mon = mo - 1, .tm_mday = d, .tm_hour = h, .tm_min = mi, .tm_sec = s};
    return (int64_t)timegm(&tm);
}
#define UTC_MS(y, mo, d, h, mi) (wall(y, mo, d, h, mi, 0) * 1000)

/* The database with the migrations applied, its session's TimeZone set to
 * Asia/Tokyo (so that nothing may lean on it); NULL (a failure counted) when
 * there is none. */
static struct db *open_db(void) {
    const char *url = getenv("CONVEYOR_DATABASE_URL");
    if (!url || !*url) {
        fprintf(stderr, "CONVEYOR_DATABASE_URL is not set: this test needs the database "
                        "(eval \"$(scripts/servers.sh env)\")\n");
        test_failures++;
        return NULL;
    }
    char err[1024];
    struct db *db = db_connect(url, err, sizeof err);
    if (!db) {
        fprintf(stderr, "cannot connect to the database: %s\n", err);
        test_failures++;
        return NULL;
    }
    if (migrate_run(db, err, sizeof err) < 0 || db_cmd(db, "SET TimeZone TO 'Asia/Tokyo'") < 0) {
        fprintf(stderr, "migrations or SET TimeZone: %s %s\n", err, db_errstr(db));
        test_failures++;
        db_close(db);
        return NULL;
    }
    return db;
}

static struct cfg_schedule cron_schedule(const char *expr, const char *zone) {
    struct cfg_schedule s = {.kind = SCHEDULE_CRON};
    snprintf(s.name, sizeof s.name, "zone-test");
    snprintf(s.timezone, sizeof s.timezone, "%s", zone);
    char why[256];
    if (cron_parse(expr, &s.cron, why, sizeof why) < 0) {
        fprintf(stderr, "'%s': %s\n", expr, why);
        test_failures++;
    }
    return s;
}

/* The slot after `after`: its wall time, key, id and instant. */
struct slot {
    int64_t wall, instant_ms;
    char key[SLOT_KEY_MAX], id[ID_LEN + 1];
};
static struct slot next_slot(struct db *db, const struct cfg_schedule *s, int64_t after) {
    struct slot x = {.wall = cron_next(&s->cron, after)};
    schedule_slot_key(s, x.wall, x.key);
    schedule_slot_id(s->name, x.key, x.id);
    CHECK(schedule_slot_instant(db, s, x.wall, &x.instant_ms) == 0);
    return x;
}

TEST(spring_forward_fires_at_the_change_once) {
    struct db *db = open_db();
    if (!db) return;
    struct cfg_schedule s = cron_schedule("30 2 * * *", "Europe/Paris");
    struct slot a = next_slot(db, &s, wall(2026, 3, 28, 12, 0, 0));
    CHECK_STR(a.key, "2026-03-29T02:30:00"); /* a wall time that does not exist in Paris */
    CHECK(a.instant_ms == UTC_MS(2026, 3, 29, 1, 0)); /* the change: 02:00 CET became 03:00 CEST */
    struct slot b = next_slot(db, &s, a.wall);
    CHECK_STR(b.key, "2026-03-30T02:30:00");
    CHECK(b.instant_ms == UTC_MS(2026, 3, 30, 0, 30));
    char text[40];
    CHECK(schedule_slot_text(db, &s, a.instant_ms, text) == 0);
    CHECK_STR(text, "2026-03-29T03:00:00+02:00");
    CHECK(schedule_slot_text(db, &s, b.instant_ms, text) == 0);
    CHECK_STR(text, "2026-03-30T02:30:00+02:00");
    CHECK(schedule_slot_text(db, &s, UTC_MS(2026, 3, 28, 1, 30), text) == 0);
    CHECK_STR(text, "2026-03-28T02:30:00+01:00");
    db_close(db);
}

TEST(fall_back_wall_time_is_one_slot) {
    struct db *db = open_db();
    if (!db) return;
    struct cfg_schedule s = cron_schedule("30 2 * * *", "Europe/Paris");
    struct slot a = next_slot(db, &s, wall(2026, 10, 24, 12, 0, 0));
    CHECK_STR(a.key, "2026-10-25T02:30:00"); /* happens twice in Paris: one slot, one id */
    CHECK(a.instant_ms == UTC_MS(2026, 10, 25, 1, 30)); /* the later of the two, in standard time */
    struct slot again = next_slot(db, &s, wall(2026, 10, 24, 23, 0, 0));
    CHECK_STR(again.id, a.id);
    CHECK(again.instant_ms == a.instant_ms);
    struct slot b = next_slot(db, &s, a.wall);
    CHECK_STR(b.key, "2026-10-26T02:30:00");
    CHECK(b.instant_ms == UTC_MS(2026, 10, 26, 1, 30));
    CHECK(strcmp(a.id, b.id) != 0);
    char text[40];
    CHECK(schedule_slot_text(db, &s, a.instant_ms, text) == 0);
    CHECK_STR(text, "2026-10-25T02:30:00+01:00");
    CHECK(schedule_slot_text(db, &s, UTC_MS(2026, 10, 25, 0, 30), text) == 0); /* the first 02:30, in summer time */
    CHECK_STR(text, "2026-10-25T02:30:00+02:00");
    db_close(db);
}

TEST(half_hours_across_the_fall_back_each_once) {
    struct db *db = open_db();
    if (!db) return;
    struct cfg_schedule s = cron_schedule("*/30 * * * *", "Europe/Paris");
    int seen_0200 = 0, seen_0230 = 0, n = 0;
    int64_t previous_instant = 0;
    for (int64_t t = wall(2026, 10, 25, 0, 0, 0); t < wall(2026, 10, 25, 4, 0, 0); n++) {
        struct slot x = next_slot(db, &s, t);
        seen_0200 += strcmp(x.key, "2026-10-25T02:00:00") == 0;
        seen_0230 += strcmp(x.key, "2026-10-25T02:30:00") == 0;
        CHECK(x.instant_ms > previous_instant); /* one slot per wall time, in order */
        previous_instant = x.instant_ms;
        t = x.wall;
    }
    CHECK(seen_0200 == 1 && seen_0230 == 1);
    CHECK(n == 8); /* 00:30 ... 04:00 */
    db_close(db);
}

TEST(every_and_utc_are_written_with_z) {
    struct db *db = open_db();
    if (!db) return;
    struct cfg_schedule every = {.kind = SCHEDULE_EVERY, .every_s = 900};
    int64_t ms = 0;
    CHECK(schedule_slot_instant(db, &every, 1767225600, &ms) == 0 && ms == 1767225600000LL);
    char text[40];
    CHECK(schedule_slot_text(db, &every, ms, text) == 0);
    CHECK_STR(text, "2026-01-01T00:00:00Z");
    struct cfg_schedule utc = cron_schedule("0 3 * * *", "UTC");
    CHECK(schedule_slot_instant(db, &utc, wall(2026, 7, 1, 3, 0, 0), &ms) == 0 && ms == UTC_MS(2026, 7, 1, 3, 0));
    CHECK(schedule_slot_text(db, &utc, ms, text) == 0);
    CHECK_STR(text, "2026-07-01T03:00:00Z");
    struct cfg_schedule ny = cron_schedule("0 3 * * *", "America/New_York");
    CHECK(schedule_slot_text(db, &ny, UTC_MS(2026, 1, 15, 8, 0), text) == 0);
    CHECK_STR(text, "2026-01-15T03:00:00-05:00");
    struct cfg_schedule india = cron_schedule("0 3 * * *", "Asia/Kolkata");
    CHECK(schedule_slot_text(db, &india, UTC_MS(2026, 1, 15, 8, 0), text) == 0);
    CHECK_STR(text, "2026-01-15T13:30:00+05:30");
    db_close(db);
}

TEST(wall_now_is_the_database_clock_in_the_zone) {
    struct db *db = open_db();
    if (!db) return;
    struct cfg_schedule utc = cron_schedule("* * * * *", "UTC"), paris = cron_schedule("* * * * *", "Europe/Paris");
    struct cfg_schedule every = {.kind = SCHEDULE_EVERY, .every_s = 60};
    int64_t base = 0, now_ms = 0;
    CHECK(schedule_wall_now(db, &utc, &base, &now_ms) == 0);
    CHECK(now_ms > UTC_MS(2020, 1, 1, 0, 0));
    CHECK(base == now_ms / 1000); /* now() is the transaction's: one value for both columns */
    CHECK(schedule_wall_now(db, &every, &base, &now_ms) == 0 && base == now_ms / 1000);
    CHECK(schedule_wall_now(db, &paris, &base, &now_ms) == 0);
    int64_t offset = base - now_ms / 1000;
    CHECK(offset == 3600 || offset == 7200);
    db_close(db);
}

TEST_MAIN()
