/* utf8.c - UTF-8 well-formedness (RFC 3629), length in code points, and a
 * repair of text cut in a character. */
#include "core.h"

#include <string.h>

bool utf8_valid(const char *str, size_t len) {
    const unsigned char *s = (const unsigned char *)str, *end = s + len;
    while (s < end) {
        unsigned c = *s;
        if (c < 0x80) { s++; continue; }
        int n;
        unsigned min;
        if (c >= 0xC2 && c <= 0xDF) { n = 1; min = 0x80; }
        else if (c >= 0xE0 && c <= 0xEF) { n = 2; min = 0x800; }
        else if (c >= 0xF0 && c <= 0xF4) { n = 3; min = 0x10000; }
        else return false;
        if (end - s <= n) return false;
        unsigned cp = c & (0x3F >> n);
        for (int i = 1; i <= n; i++) {
            if ((s[i] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (s[i] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        s += n + 1;
    }
    return true;
}

size_t utf8_chars(const char *s) {
    size_t n = 0;
    for (; *s; s++)
        if (((unsigned char)*s & 0xC0) != 0x80) n++;
    return n;
}

void utf8_cut(char *s) {
    for (unsigned char *p = (unsigned char *)s; *p;) {
        size_t n = *p < 0x80 ? 1 : *p >= 0xF0 ? 4 : *p >= 0xE0 ? 3 : 2;
        size_t avail = strnlen((const char *)p, n);
        if (avail == n && utf8_valid((const char *)p, n)) p += n;
        else *p++ = '?';
    }
}
