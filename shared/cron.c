/* cron.c - cron expressions: parsed into bit sets, and the next wall time that
 * matches. Wall times are "naive" seconds (timegm of the wall clock's fields):
 * no zone is involved here, ever (schedule_zone.c maps them to instants). */
#include "core.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* One field of an expression: its name (for messages), its range, its names. */
struct cron_field {
    const char *what;
    int min, max;
    const char *const *names; /* names[i] is the value name_base + i; NULL: no names */
    int name_base;
    bool question;            /* `?` allowed (the day fields) */
};

static const char *const month_names[] = {"JAN", "FEB", "MAR", "APR", "MAY", "JUN",
                                          "JUL", "AUG", "SEP", "OCT", "NOV", "DEC", NULL};
static const char *const day_names[] = {"SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", NULL};

static const struct cron_field F_SECOND = {"second", 0, 59, NULL, 0, false};
static const struct cron_field F_MINUTE = {"minute", 0, 59, NULL, 0, false};
static const struct cron_field F_HOUR = {"hour", 0, 23, NULL, 0, false};
static const struct cron_field F_MDAY = {"day of month", 1, 31, NULL, 0, true};
static const struct cron_field F_MONTH = {"month", 1, 12, month_names, 1, false};
static const struct cron_field F_WDAY = {"day of week", 0, 7, day_names, 0, true};

/* Reads a number or (when f has names) a name at *p into *v, moving *p past
 * it. Returns 0, or CV_ECONFIG with why. */
static int read_value(const struct cron_field *f, const char **p, int *v, char *why, size_t n) {
    const char *s = *p;
    if (isdigit((unsigned char)*s)) {
        long x = 0;
        while (isdigit((unsigned char)*s)) {
            if (x < 1000000) x = x * 10 + (*s - '0');
            s++;
        }
        if (x < f->min || x > f->max) {
            snprintf(why, n, "%s: %ld is out of range %d-%d", f->what, x, f->min, f->max);
            return CV_ECONFIG;
        }
        *v = (int)x;
        *p = s;
        return 0;
    }
    if (f->names && isalpha((unsigned char)s[0]) && isalpha((unsigned char)s[1]) && isalpha((unsigned char)s[2]) &&
        !isalnum((unsigned char)s[3])) {
        for (int i = 0; f->names[i]; i++)
            if (strncasecmp(s, f->names[i], 3) == 0) {
                *v = f->name_base + i;
                *p = s + 3;
                return 0;
            }
    }
    int len = 0;
    while (s[len] && s[len] != ',' && s[len] != '-' && s[len] != '/' && len < 20) len++;
    snprintf(why, n, "%s: '%.*s' is not %s", f->what, len, s,
             !f->names ? "a number" : f->name_base ? "a number or a month name" : "a number or a day name");
    return CV_ECONFIG;
}

/* Reads a step "/n" at *p (n >= 1) into *step; no '/' leaves *step 1. */
static int read_step(const struct cron_field *f, const char **p, int *step, char *why, size_t n) {
    *step = 1;
    if (**p != '/') return 0;
    const char *s = *p + 1;
    if (!isdigit((unsigned char)*s)) {
        snprintf(why, n, "%s: a step must be a number after '/'", f->what);
        return CV_ECONFIG;
    }
    long x = 0;
    while (isdigit((unsigned char)*s)) {
        if (x < 1000000) x = x * 10 + (*s - '0');
        s++;
    }
    if (x == 0 || x > f->max) {
        snprintf(why, n, "%s: step %ld is out of range 1-%d", f->what, x, f->max);
        return CV_ECONFIG;
    }
    *step = (int)x;
    *p = s;
    return 0;
}

/* Parses one comma-separated item (`*`, `?`, a, a-b, with an optional /n) of
 * field f into the bits of *bits. */
static int parse_item(const struct cron_field *f, const char *item, uint64_t *bits, char *why, size_t n) {
    const char *p = item;
    int lo = f->min, hi = f->max, step;
    bool whole = false, range = false;
    if (*p == '*' || (*p == '?' && f->question)) {
        p++;
        whole = true;
    } else {
        if (read_value(f, &p, &lo, why, n) < 0) return CV_ECONFIG;
        hi = lo;
        if (*p == '-') {
            p++;
            range = true;
            if (read_value(f, &p, &hi, why, n) < 0) return CV_ECONFIG;
            if (f == &F_WDAY && hi == 0 && lo > 0) hi = 7; /* FRI-SUN: Sunday as 7 */
            if (hi < lo) {
                snprintf(why, n, "%s: range %d-%d goes backwards", f->what, lo, hi);
                return CV_ECONFIG;
            }
        }
    }
    if (read_step(f, &p, &step, why, n) < 0) return CV_ECONFIG;
    if (step > 1 && !whole && !range) hi = f->max; /* a/n: from a to the end */
    if (*p) {
        snprintf(why, n, "%s: unexpected '%s' in '%s'", f->what, p, item);
        return CV_ECONFIG;
    }
    for (int v = lo; v <= hi; v += step) *bits |= (uint64_t)1 << v;
    return 0;
}

/* Parses field text (a comma list) into *bits; *any says it was `*` or `?`. */
static int parse_field(const struct cron_field *f, const char *text, uint64_t *bits, bool *any, char *why,
                       size_t n) {
    *bits = 0;
    *any = strcmp(text, "*") == 0 || (f->question && strcmp(text, "?") == 0);
    if (*text == '?' && !f->question) {
        snprintf(why, n, "%s: '?' is only for the day of month and the day of week", f->what);
        return CV_ECONFIG;
    }
    char item[64];
    const char *s = text;
    for (;;) {
        size_t len = strcspn(s, ",");
        if (len == 0 || len >= sizeof item) {
            snprintf(why, n, "%s: %s in '%s'", f->what, len ? "an item too long" : "an empty item", text);
            return CV_ECONFIG;
        }
        memcpy(item, s, len);
        item[len] = '\0';
        if (parse_item(f, item, bits, why, n) < 0) return CV_ECONFIG;
        if (!s[len]) return 0;
        s += len + 1;
    }
}

int cron_parse(const char *expr, struct cron *out, char *why, size_t n) {
    memset(out, 0, sizeof *out);
    char copy[256];
    if (!expr || strlen(expr) >= sizeof copy) {
        snprintf(why, n, "%s", expr ? "longer than 255 characters" : "no expression");
        return CV_ECONFIG;
    }
    snprintf(copy, sizeof copy, "%s", expr);
    char *fields[7], *save = NULL;
    int nf = 0;
    for (char *t = strtok_r(copy, " \t", &save); t; t = strtok_r(NULL, " \t", &save))
        if (nf < 7) fields[nf++] = t;
        else nf++;
    if (nf != 5 && nf != 6) {
        snprintf(why, n, "expected 5 or 6 fields, got %d", nf);
        return CV_ECONFIG;
    }
    out->with_seconds = nf == 6;
    char **f = fields + (nf - 5);
    uint64_t b[6];
    bool any, mday_any, wday_any;
    b[5] = 1; /* five fields: second 0 */
    if (nf == 6 && parse_field(&F_SECOND, fields[0], &b[5], &any, why, n) < 0) return CV_ECONFIG;
    if (parse_field(&F_MINUTE, f[0], &b[0], &any, why, n) < 0 || parse_field(&F_HOUR, f[1], &b[1], &any, why, n) < 0 ||
        parse_field(&F_MDAY, f[2], &b[2], &mday_any, why, n) < 0 ||
        parse_field(&F_MONTH, f[3], &b[3], &any, why, n) < 0 ||
        parse_field(&F_WDAY, f[4], &b[4], &wday_any, why, n) < 0)
        return CV_ECONFIG;
    if (b[4] & (1u << 7)) b[4] = (b[4] | 1u) & 0x7f; /* 7 is Sunday, as 0 */
    out->seconds = b[5];
    out->minutes = b[0];
    out->hours = (uint32_t)b[1];
    out->mdays = (uint32_t)b[2];
    out->months = (uint16_t)b[3];
    out->wdays = (uint8_t)b[4];
    out->mday_any = mday_any;
    out->wday_any = wday_any;
    return 0;
}

#define NO_BIT 64
/* The lowest set bit of bits at or above from, or NO_BIT when none. */
static int next_bit(uint64_t bits, int from) {
    if (from > 63) return NO_BIT;
    uint64_t rest = bits & (~(uint64_t)0 << from);
    return rest ? __builtin_ctzll(rest) : NO_BIT;
}

/* Vixie's rule: with both day fields restricted, either may match. */
static bool day_matches(const struct cron *c, const struct tm *tm) {
    bool md = c->mdays & (1u << tm->tm_mday), wd = c->wdays & (1u << tm->tm_wday);
    if (c->mday_any && c->wday_any) return true;
    if (c->mday_any) return wd;
    if (c->wday_any) return md;
    return md || wd;
}

#define CRON_HORIZON_S (5LL * 366 * 86400) /* cron_next looks this far (5 years and a little) */

/* Walks field by field, from the month down: a field that does not match moves
 * t to the start of its next value (timegm normalises the carry), so a yearly
 * expression takes a few dozen steps. */
int64_t cron_next(const struct cron *c, int64_t after) {
    int64_t limit = after + CRON_HORIZON_S;
    time_t t = (time_t)(after + 1);
    struct tm tm;
    while ((int64_t)t <= limit) {
        if (!gmtime_r(&t, &tm)) return CRON_NONE;
        if (!(c->months & (1u << (tm.tm_mon + 1)))) {
            tm.tm_mon++, tm.tm_mday = 1, tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
        } else if (!day_matches(c, &tm)) {
            tm.tm_mday++, tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
        } else {
            int h = next_bit(c->hours, tm.tm_hour);
            if (h != tm.tm_hour) {
                if (h == NO_BIT) tm.tm_mday++, tm.tm_hour = 0;
                else tm.tm_hour = h;
                tm.tm_min = tm.tm_sec = 0;
            } else {
                int m = next_bit(c->minutes, tm.tm_min);
                if (m != tm.tm_min) {
                    if (m == NO_BIT) tm.tm_hour++, tm.tm_min = 0;
                    else tm.tm_min = m;
                    tm.tm_sec = 0;
                } else {
                    int s = next_bit(c->seconds, tm.tm_sec);
                    if (s == tm.tm_sec) return (int64_t)t;
                    if (s == NO_BIT) tm.tm_min++, tm.tm_sec = 0;
                    else tm.tm_sec = s;
                }
            }
        }
        tm.tm_isdst = 0;
        t = timegm(&tm);
    }
    return CRON_NONE;
}
