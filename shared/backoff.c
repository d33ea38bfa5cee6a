/* backoff.c - capped exponential backoff with jitter (in [d/2, d]), and the one loop
 * that waits for a server to answer. */
#include "core.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sodium.h>

int backoff_ms(int attempt, int base_ms, int cap_ms) {
    long d = base_ms;
    for (int i = 0; i < attempt && d < cap_ms; i++) d *= 2;
    if (d > cap_ms) d = cap_ms;
    /* full jitter in [d/2, d] keeps a floor so a loop never spins */
    return (int)(d / 2 + randombytes_uniform((uint32_t)(d / 2 + 1)));
}

void backoff_sleep(int ms, volatile sig_atomic_t *stop) {
    while (ms > 0 && !(stop && *stop)) {
        int step = ms < 100 ? ms : 100;
        struct timespec ts = {0, (long)step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
}

void *backoff_open(backoff_open_fn open, const void *arg, const char *what, volatile sig_atomic_t *stop, char *err,
                   size_t errlen) {
    char why[1024];
    err[0] = '\0';
    for (int attempt = 0; !(stop && *stop); attempt++) {
        int cls = CV_ERETRY;
        void *conn = open(arg, &cls, why, sizeof why);
        if (conn) {
            if (attempt > 0) log_info("%s is back", what);
            // cppcheck-suppress returnDanglingLifetime ; conn is what open made, not &cls (cppcheck cannot tell)
            return conn;
        }
        if (cls != CV_ERETRY) {
            snprintf(err, errlen, "%s", why);
            return NULL;
        }
        if (attempt == 0) log_warn("%s unreachable, waiting for it: %s", what, why);
        backoff_sleep(backoff_ms(attempt, 100, 5000), stop);
    }
    return NULL;
}
