/* test_cron.c - cron expressions: what parses (and why not), and the next wall time. */
#include "core.h"
#include "test.h"

#include <time.h>

/* A wall time as naive seconds. */
static int64_t wall(int y, int mo, int d, int h, int mi, int s) {
    struct tm tm = {.tm_year = y - 1900, .tm_mon = mo - 1, .tm_mday = d, .tm_hour = h, .tm_min = mi, .tm_sec = s};
    return (int64_t)timegm(&tm);
}

/* The next wall time of expr after `after` (the expression must parse). */
static int64_t next(const char *expr, int64_t after) {
    struct cron c;
    char why[256] = "";
    if (cron_parse(expr, &c, why, sizeof why) != 0) {
        fprintf(stderr, "'%s' does not parse: %s\n", expr, why);
        test_failures++;
        return -2;
    }
    return cron_next(&c, after);
}

/* expr is refused with a reason holding words. */
static void refused(const char *expr, const char *words) {
    struct cron c;
    char why[256] = "";
    int rc = cron_parse(expr, &c, why, sizeof why);
    if (rc != CV_ECONFIG || !strstr(why, words)) {
        fprintf(stderr, "'%s': rc %d, why \"%s\", want \"%s\"\n", expr, rc, why, words);
        test_failures++;
    }
}

TEST(field_counts_are_checked) {
    refused("* * * *", "expected 5 or 6 fields, got 4");
    refused("* * * * * * *", "expected 5 or 6 fields, got 7");
    refused("", "expected 5 or 6 fields, got 0");
    refused("   ", "expected 5 or 6 fields, got 0");
}

TEST(each_field_names_itself_when_out_of_range) {
    refused("60 * * * *", "minute: 60 is out of range 0-59");
    refused("* 24 * * *", "hour: 24 is out of range 0-23");
    refused("* * 0 * *", "day of month: 0 is out of range 1-31");
    refused("* * 32 * *", "day of month: 32 is out of range 1-31");
    refused("* * * 13 *", "month: 13 is out of range 1-12");
    refused("* * * 0 *", "month: 0 is out of range 1-12");
    refused("* * * * 8", "day of week: 8 is out of range 0-7");
    refused("60 * * * * *", "second: 60 is out of range 0-59");
    refused("0 60 * * * *", "minute: 60 is out of range 0-59"); /* six fields: the second field is the minute */
    refused("0 0 0 0 * *", "day of month: 0 is out of range 1-31");
    refused("99999999999 * * * *", "minute: ");
}

TEST(steps_ranges_and_junk_are_refused) {
    refused("*/0 * * * *", "minute: step 0 is out of range");
    refused("0 1-5/0 * * *", "hour: step 0");
    refused("0 0 * * */", "day of week: a step must be a number");
    refused("5-3 * * * *", "minute: range 5-3 goes backwards");
    refused("x * * * *", "minute: 'x' is not a number");
    refused("* * * FOO *", "month: 'FOO' is not a number or a month name");
    refused("* * * * FUNDAY", "day of week: 'FUNDAY' is not a number or a day name");
    refused("* MON * * *", "hour: 'MON' is not a number");
    refused("1,,2 * * * *", "minute: an empty item");
    refused("1, * * * *", "minute: an empty item");
    refused("1-2-3 * * * *", "minute: unexpected '-3'");
    refused("? * * * *", "minute: '?' is only for");
    refused("* * * ? *", "month: '?' is only for");
    refused("1a * * * *", "minute: unexpected 'a'");
}

TEST(what_parses) {
    struct cron c;
    char why[256];
    CHECK(cron_parse("0 3 * * *", &c, why, sizeof why) == 0 && !c.with_seconds);
    CHECK(c.minutes == 1 && c.hours == 1u << 3 && c.seconds == 1 && c.mday_any && c.wday_any);
    CHECK(cron_parse("*/15 * * * *", &c, why, sizeof why) == 0);
    CHECK(c.minutes == ((1ull << 0) | (1ull << 15) | (1ull << 30) | (1ull << 45)));
    CHECK(cron_parse("10-20/5 * * * *", &c, why, sizeof why) == 0);
    CHECK(c.minutes == ((1ull << 10) | (1ull << 15) | (1ull << 20)));
    CHECK(cron_parse("50/5 * * * *", &c, why, sizeof why) == 0 && c.minutes == ((1ull << 50) | (1ull << 55)));
    CHECK(cron_parse("1,2,3 * * jan-Mar mon-FRI", &c, why, sizeof why) == 0);
    CHECK(c.months == 0xe && c.wdays == 0x3e && !c.wday_any && c.mday_any);
    CHECK(cron_parse("0 0 ? * 7", &c, why, sizeof why) == 0 && c.wdays == 1 && c.mday_any);
    CHECK(cron_parse("0 0 * * 5-7", &c, why, sizeof why) == 0 && c.wdays == ((1 << 0) | (1 << 5) | (1 << 6)));
    CHECK(cron_parse("30 0 0 * * *", &c, why, sizeof why) == 0 && c.with_seconds && c.seconds == 1ull << 30);
    CHECK(cron_parse("  0\t3  *  * * ", &c, why, sizeof why) == 0);
}

TEST(next_crosses_minute_hour_day_month_and_year_ends) {
    CHECK(next("* * * * *", wall(2026, 5, 1, 10, 0, 0)) == wall(2026, 5, 1, 10, 1, 0));
    CHECK(next("* * * * *", wall(2026, 5, 1, 10, 0, 59)) == wall(2026, 5, 1, 10, 1, 0));
    CHECK(next("0 * * * *", wall(2026, 5, 1, 10, 0, 0)) == wall(2026, 5, 1, 11, 0, 0));
    CHECK(next("0 * * * *", wall(2026, 5, 1, 23, 30, 0)) == wall(2026, 5, 2, 0, 0, 0));
    CHECK(next("30 2 * * *", wall(2026, 4, 30, 3, 0, 0)) == wall(2026, 5, 1, 2, 30, 0));
    CHECK(next("0 0 1 * *", wall(2026, 12, 15, 0, 0, 0)) == wall(2027, 1, 1, 0, 0, 0));
    CHECK(next("59 23 31 12 *", wall(2026, 12, 31, 23, 59, 0)) == wall(2027, 12, 31, 23, 59, 0));
    CHECK(next("0 0 31 * *", wall(2026, 4, 1, 0, 0, 0)) == wall(2026, 5, 31, 0, 0, 0)); /* April has 30 days */
    CHECK(next("0 3 * * *", wall(2026, 5, 1, 2, 59, 59)) == wall(2026, 5, 1, 3, 0, 0));
}

TEST(feb_29_comes_in_leap_years) {
    CHECK(next("0 0 29 2 *", wall(2026, 1, 1, 0, 0, 0)) == wall(2028, 2, 29, 0, 0, 0));
    CHECK(next("0 0 29 2 *", wall(2028, 2, 29, 0, 0, 0)) == wall(2032, 2, 29, 0, 0, 0));
    CHECK(next("0 12 * 2 *", wall(2028, 2, 28, 13, 0, 0)) == wall(2028, 2, 29, 12, 0, 0));
    CHECK(next("0 12 * 2 *", wall(2027, 2, 28, 13, 0, 0)) == wall(2028, 2, 1, 12, 0, 0));
    CHECK(next("0 0 29 2 *", wall(2097, 3, 1, 0, 0, 0)) == CRON_NONE); /* 2100 is not a leap year: 2104 is too far */
}

TEST(a_day_that_never_comes_gives_minus_one) {
    CHECK(next("0 0 30 2 *", wall(2026, 1, 1, 0, 0, 0)) == CRON_NONE);
    CHECK(next("0 0 31 4,6,9,11 *", wall(2026, 1, 1, 0, 0, 0)) == CRON_NONE);
}

TEST(either_day_field_matches_when_both_are_restricted) {
    /* 2026-05-01 is a Friday. "the 15th, or any Monday" */
    CHECK(next("0 0 15 * MON", wall(2026, 5, 1, 0, 0, 0)) == wall(2026, 5, 4, 0, 0, 0));
    CHECK(next("0 0 15 * MON", wall(2026, 5, 13, 0, 0, 0)) == wall(2026, 5, 15, 0, 0, 0));
    /* one restricted, the other `*` or `?`: only the restricted one counts */
    CHECK(next("0 0 15 * *", wall(2026, 5, 1, 0, 0, 0)) == wall(2026, 5, 15, 0, 0, 0));
    CHECK(next("0 0 ? * MON", wall(2026, 5, 1, 0, 0, 0)) == wall(2026, 5, 4, 0, 0, 0));
    CHECK(next("0 0 * * 1", wall(2026, 5, 4, 0, 0, 0)) == wall(2026, 5, 11, 0, 0, 0));
}

TEST(names_and_sunday_as_0_and_7) {
    /* 2026-05-03 is a Sunday */
    CHECK(next("0 9 * * 0", wall(2026, 5, 1, 0, 0, 0)) == wall(2026, 5, 3, 9, 0, 0));
    CHECK(next("0 9 * * 7", wall(2026, 5, 1, 0, 0, 0)) == wall(2026, 5, 3, 9, 0, 0));
    CHECK(next("0 9 * * sun", wall(2026, 5, 1, 0, 0, 0)) == wall(2026, 5, 3, 9, 0, 0));
    CHECK(next("0 9 * * SAT-SUN", wall(2026, 5, 2, 10, 0, 0)) == wall(2026, 5, 3, 9, 0, 0)); /* a range may end on Sunday */
    CHECK(next("0 9 * * FRI-0", wall(2026, 5, 4, 0, 0, 0)) == wall(2026, 5, 8, 9, 0, 0));
    refused("0 9 * * SUN-SAT/0", "step 0");
    CHECK(next("0 9 1 jun *", wall(2026, 5, 1, 0, 0, 0)) == wall(2026, 6, 1, 9, 0, 0));
    CHECK(next("0 9 1 DEC *", wall(2026, 5, 1, 0, 0, 0)) == wall(2026, 12, 1, 9, 0, 0));
}

TEST(six_fields_have_seconds) {
    CHECK(next("*/10 * * * * *", wall(2026, 5, 1, 0, 0, 0)) == wall(2026, 5, 1, 0, 0, 10));
    CHECK(next("*/10 * * * * *", wall(2026, 5, 1, 0, 0, 55)) == wall(2026, 5, 1, 0, 1, 0));
    CHECK(next("30 0 3 * * *", wall(2026, 5, 1, 3, 0, 30)) == wall(2026, 5, 2, 3, 0, 30));
    CHECK(next("* * * * * *", wall(2026, 5, 1, 0, 0, 0)) == wall(2026, 5, 1, 0, 0, 1));
}

TEST(steps_of_15_minutes) {
    int64_t t = wall(2026, 5, 1, 10, 50, 0);
    int64_t want[] = {wall(2026, 5, 1, 11, 0, 0), wall(2026, 5, 1, 11, 15, 0), wall(2026, 5, 1, 11, 30, 0),
                      wall(2026, 5, 1, 11, 45, 0), wall(2026, 5, 1, 12, 0, 0)};
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        t = next("*/15 * * * *", t);
        CHECK(t == want[i]);
    }
}

TEST(next_is_found_by_field_not_by_second) {
    /* a yearly expression from every day of a year: the walk is field by field,
     * so a year's worth of lookups is cheap; counted in steps, not timed */
    struct cron c;
    char why[256];
    CHECK(cron_parse("0 0 1 1 *", &c, why, sizeof why) == 0);
    int64_t start = wall(2026, 1, 1, 0, 0, 0);
    for (int d = 0; d < 365; d++) CHECK(cron_next(&c, start + d * 86400LL) == wall(2027, 1, 1, 0, 0, 0));
    CHECK(cron_next(&c, wall(2026, 12, 31, 23, 59, 59)) == wall(2027, 1, 1, 0, 0, 0));
    /* before the epoch too (naive seconds may be negative) */
    CHECK(cron_next(&c, wall(1969, 6, 1, 0, 0, 0)) == 0);
}

TEST_MAIN()
