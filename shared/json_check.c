/* json_check.c - strict RFC 8259 syntax check, before cJSON (which is lenient:
 * it takes raw control characters in strings, leading zeros, "1."). Recursive
 * descent, no allocation, depth-limited. */
#include "core.h"

#include <string.h>

struct scan {
    const unsigned char *p, *end;
    int depth, max_depth;
    const char *why;
};

static void ws(struct scan *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r')) s->p++;
}

static bool fail(struct scan *s, const char *why) {
    if (!s->why) s->why = why;
    return false;
}

static bool hex4(struct scan *s, unsigned *v) {
    *v = 0;
    if (s->end - s->p < 4) return false;
    for (int i = 0; i < 4; i++) {
        unsigned char c = *s->p++;
        *v <<= 4;
        if (c >= '0' && c <= '9') *v |= c - '0';
        else if (c >= 'a' && c <= 'f') *v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') *v |= c - 'A' + 10;
        else return false;
    }
    return true;
}

static bool string(struct scan *s) {
    s->p++; /* opening quote */
    while (s->p < s->end) {
        unsigned char c = *s->p++;
        if (c == '"') return true;
        if (c < 0x20) return fail(s, "a raw control character inside a string");
        if (c != '\\') continue;
        if (s->p >= s->end) break;
        c = *s->p++;
        if (strchr("\"\\/bfnrt", c) && c) continue;
        if (c != 'u') return fail(s, "an invalid escape inside a string");
        unsigned v, w;
        if (!hex4(s, &v)) return fail(s, "an invalid \\u escape");
        if (v >= 0xDC00 && v <= 0xDFFF) return fail(s, "a lone low surrogate escape");
        if (v >= 0xD800 && v <= 0xDBFF) {
            if (s->end - s->p < 6 || s->p[0] != '\\' || s->p[1] != 'u') return fail(s, "a lone high surrogate escape");
            s->p += 2;
            if (!hex4(s, &w) || w < 0xDC00 || w > 0xDFFF) return fail(s, "a lone high surrogate escape");
        }
    }
    return fail(s, "an unterminated string");
}

static bool digits(struct scan *s) {
    const unsigned char *start = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9') s->p++;
    return s->p > start;
}

static bool number(struct scan *s) {
    if (*s->p == '-') s->p++;
    if (s->p < s->end && *s->p == '0') s->p++;
    else if (!digits(s)) return fail(s, "an invalid number");
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (!digits(s)) return fail(s, "an invalid number");
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-')) s->p++;
        if (!digits(s)) return fail(s, "an invalid number");
    }
    if (s->p < s->end && *s->p >= '0' && *s->p <= '9') return fail(s, "a number with a leading zero");
    return true;
}

static bool literal(struct scan *s, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0) return fail(s, "not valid JSON");
    s->p += n;
    return true;
}

static bool value(struct scan *s);

static bool container(struct scan *s, unsigned char close) {
    if (++s->depth > s->max_depth) return fail(s, "nesting deeper than the limit");
    s->p++;
    ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        s->depth--;
        return true;
    }
    for (;;) {
        if (close == '}') {
            if (s->p >= s->end || *s->p != '"') return fail(s, "an object key that is not a string");
            if (!string(s)) return false;
            ws(s);
            if (s->p >= s->end || *s->p != ':') return fail(s, "a missing ':' in an object");
            s->p++;
        }
        if (!value(s)) return false;
        ws(s);
        if (s->p >= s->end) return fail(s, "an unterminated object or array");
        if (*s->p == ',') {
            s->p++;
            ws(s);
            continue;
        }
        if (*s->p == close) {
            s->p++;
            s->depth--;
            return true;
        }
        return fail(s, "a missing ',' or closing bracket");
    }
}

static bool value(struct scan *s) {
    ws(s);
    if (s->p >= s->end) return fail(s, "not valid JSON (nothing where a value belongs)");
    switch (*s->p) {
    case '{': return container(s, '}');
    case '[': return container(s, ']');
    case '"': return string(s);
    case 't': return literal(s, "true");
    case 'f': return literal(s, "false");
    case 'n': return literal(s, "null");
    default:
        if (*s->p == '-' || (*s->p >= '0' && *s->p <= '9')) return number(s);
        return fail(s, "not valid JSON");
    }
}

bool json_check(const char *text, size_t len, int max_depth, const char **why) {
    struct scan s = {(const unsigned char *)text, (const unsigned char *)text + len, 0, max_depth, NULL};
    bool ok = value(&s);
    if (ok) {
        ws(&s);
        if (s.p != s.end) ok = fail(&s, "bytes after the JSON value");
    }
    if (why) *why = s.why;
    return ok;
}
