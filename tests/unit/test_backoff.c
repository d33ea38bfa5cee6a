/* test_backoff.c - capped exponential backoff with jitter (shared/backoff.c). */
#include "core.h"
#include "test.h"

#include <signal.h>

TEST(delay_doubles_within_its_jitter_and_stops_at_the_cap) {
    for (int attempt = 0; attempt < 12; attempt++) {
        long d = 100L << attempt;
        if (d > 5000) d = 5000;
        for (int k = 0; k < 200; k++) {
            int ms = backoff_ms(attempt, 100, 5000);
            CHECK(ms >= d / 2 && ms <= d);
        }
    }
}

TEST(huge_attempts_do_not_overflow) {
    for (int attempt = 30; attempt < 40; attempt++) {
        int ms = backoff_ms(attempt, 250, 10000);
        CHECK(ms >= 5000 && ms <= 10000);
    }
    int ms = backoff_ms(1000000, 100, 5000);
    CHECK(ms >= 2500 && ms <= 5000);
}

TEST(jitter_spreads_the_delays) {
    int lo = 1 << 30, hi = 0;
    for (int k = 0; k < 500; k++) {
        int ms = backoff_ms(5, 100, 100000);
        lo = ms < lo ? ms : lo;
        hi = ms > hi ? ms : hi;
    }
    CHECK(hi - lo > 500); /* 1600..3200 ms: not one value */
}

TEST(sleep_ends_early_when_stopped) {
    volatile sig_atomic_t stop = 1;
    int64_t t0 = clock_mono_ms();
    backoff_sleep(5000, &stop);
    CHECK(clock_mono_ms() - t0 < 1000);
    t0 = clock_mono_ms();
    backoff_sleep(150, NULL);
    CHECK(clock_mono_ms() - t0 >= 140);
}

TEST_MAIN()
