/* backoff.c - capped exponential backoff with full jitter. */
#include "core.h"

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
