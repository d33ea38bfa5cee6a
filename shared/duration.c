/* duration.c - durations as written in queues.conf: "90s", "15m", "1h", "2d". */
#include "core.h"

#include <ctype.h>

bool duration_parse(const char *s, int64_t *seconds) {
    if (!s || !isdigit((unsigned char)*s)) return false;
    int64_t v = 0;
    for (; isdigit((unsigned char)*s); s++) {
        if (v > INT64_MAX / 10 / 86400) return false; /* too long: refused, not wrapped */
        v = v * 10 + (*s - '0');
    }
    int64_t unit = 1;
    switch (*s) {
    case '\0': break;
    case 's': unit = 1; s++; break;
    case 'm': unit = 60; s++; break;
    case 'h': unit = 3600; s++; break;
    case 'd': unit = 86400; s++; break;
    default: return false;
    }
    if (*s) return false;
    *seconds = v * unit;
    return true;
}
