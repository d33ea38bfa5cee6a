/* id.c - UUIDs (libuuid). */
#include "core.h"

#include <ctype.h>
#include <uuid/uuid.h>

void id_new(char out[ID_LEN + 1]) {
    uuid_t u;
    uuid_generate_random(u);
    uuid_unparse_lower(u, out);
}

bool id_parse(const char *s, char out[ID_LEN + 1]) {
    if (!s) return false;
    for (int i = 0; i < ID_LEN; i++) {
        bool dash = (i == 8 || i == 13 || i == 18 || i == 23);
        if (dash ? s[i] != '-' : !isxdigit((unsigned char)s[i])) return false;
    }
    if (s[ID_LEN] != '\0') return false;
    if (out) {
        for (int i = 0; i < ID_LEN; i++) out[i] = (char)tolower((unsigned char)s[i]);
        out[ID_LEN] = '\0';
    }
    return true;
}
