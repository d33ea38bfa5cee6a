/* topic.c - AMQP topic-exchange matching, for the Redis stream subscriber. */
#include "core.h"

#include <string.h>

/* Matches the words of p against the words of t, both '.'-separated. */
static bool match(const char *p, const char *t) {
    if (*p == '\0') return *t == '\0';
    const char *pe = strchr(p, '.');
    size_t pl = pe ? (size_t)(pe - p) : strlen(p);
    const char *pnext = pe ? pe + 1 : p + pl;
    if (pl == 1 && *p == '#') {
        if (*pnext == '\0' && !pe) return true;       /* trailing '#' eats the rest */
        if (match(pnext, t)) return true;              /* '#' as zero words */
        if (*t == '\0') return false;
        const char *te = strchr(t, '.');
        return match(p, te ? te + 1 : t + strlen(t));  /* '#' eats one more word */
    }
    if (*t == '\0') return false;
    const char *te = strchr(t, '.');
    size_t tl = te ? (size_t)(te - t) : strlen(t);
    const char *tnext = te ? te + 1 : t + tl;
    if (!(pl == 1 && *p == '*') && !(pl == tl && memcmp(p, t, pl) == 0)) return false;
    if (!pe != !te) {
        /* one side ends here: only a trailing '#' on the pattern side may follow */
        if (pe && !te) return strcmp(pnext, "#") == 0;
        return false;
    }
    return match(pnext, tnext);
}

bool topic_match(const char *pattern, const char *type) {
    if (!pattern || !*pattern) return true;
    return match(pattern, type);
}
