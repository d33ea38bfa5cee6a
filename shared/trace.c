/* trace.c - W3C Trace Context: the traceparent of a command, and the child
 * span of each of its events (docs/contract.md §1, "Tracing"). */
#include "core.h"

#include <string.h>
#include <sodium.h>

/* True when s[0..n) is lower-case hex. */
static bool lower_hex(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
    return true;
}

/* True when s[0..n) is all '0'. */
static bool all_zero(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != '0') return false;
    return true;
}

static bool invalid(struct trace *out, const char **why, const char *reason) {
    memset(out, 0, sizeof *out);
    if (why) *why = reason;
    return false;
}

bool trace_parse(const char *s, struct trace *out, const char **why) {
    memset(out, 0, sizeof *out);
    if (why) *why = NULL;
    if (!s) return invalid(out, why, "absent");
    size_t len = strnlen(s, TRACEPARENT_LEN + 1);
    /* version "-" trace-id "-" parent-id "-" flags: 2 + 1 + 32 + 1 + 16 + 1 + 2 */
    if (len < TRACEPARENT_LEN) return invalid(out, why, "shorter than 55 characters");
    if (!lower_hex(s, 2)) return invalid(out, why, "version is not two lower-case hex digits");
    if (memcmp(s, "ff", 2) == 0) return invalid(out, why, "version ff is invalid");
    /* version 00 is exactly 55 characters; a later version may append fields
     * after a '-', and is read as version 00 (the specification's rule) */
    bool v00 = memcmp(s, "00", 2) == 0;
    if (len > TRACEPARENT_LEN && (v00 || s[TRACEPARENT_LEN] != '-'))
        return invalid(out, why, "longer than 55 characters");
    if (s[2] != '-' || s[35] != '-' || s[52] != '-') return invalid(out, why, "fields are not separated by '-'");
    if (!lower_hex(s + 3, TRACE_ID_LEN) || all_zero(s + 3, TRACE_ID_LEN))
        return invalid(out, why, "trace-id is not 32 lower-case hex digits, not all zero");
    if (!lower_hex(s + 36, TRACE_SPAN_LEN) || all_zero(s + 36, TRACE_SPAN_LEN))
        return invalid(out, why, "parent-id is not 16 lower-case hex digits, not all zero");
    if (!lower_hex(s + 53, 2)) return invalid(out, why, "trace-flags is not two lower-case hex digits");
    memcpy(out->trace_id, s + 3, TRACE_ID_LEN);
    memcpy(out->parent_id, s + 36, TRACE_SPAN_LEN);
    memcpy(out->flags, s + 53, 2);
    return true;
}

bool trace_child(const struct trace *t, char out[TRACEPARENT_LEN + 1]) {
    out[0] = '\0';
    if (!t || !t->trace_id[0]) return false;
    char span[TRACE_SPAN_LEN + 1];
    do { /* libsodium's random source, as backoff.c's jitter */
        unsigned char b[TRACE_SPAN_LEN / 2];
        randombytes_buf(b, sizeof b);
        sodium_bin2hex(span, sizeof span, b, sizeof b);
    } while (all_zero(span, TRACE_SPAN_LEN) || strcmp(span, t->parent_id) == 0);
    memcpy(out, "00-", 3);
    memcpy(out + 3, t->trace_id, TRACE_ID_LEN);
    out[35] = '-';
    memcpy(out + 36, span, TRACE_SPAN_LEN);
    out[52] = '-';
    memcpy(out + 53, t->flags, 2);
    out[TRACEPARENT_LEN] = '\0';
    return true;
}
