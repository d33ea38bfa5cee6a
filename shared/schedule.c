/* schedule.c - a schedule's slots, pure: their keys, their command ids, the
 * payload a slot sends, the next slot of an `every` schedule; and whether a
 * time zone is one of the system's tz data. The database's part (instants,
 * offsets, now) is schedule_zone.c. */
#include "core.h"

#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <uuid/uuid.h>

void schedule_slot_key(const struct cfg_schedule *s, int64_t slot, char out[SLOT_KEY_MAX]) {
    if (s->kind == SCHEDULE_EVERY) {
        snprintf(out, SLOT_KEY_MAX, "@%" PRId64, slot);
        return;
    }
    time_t t = (time_t)slot;
    struct tm tm;
    if (!gmtime_r(&t, &tm)) { /* beyond any year a cron_next gives */
        snprintf(out, SLOT_KEY_MAX, "@%" PRId64, slot);
        return;
    }
    snprintf(out, SLOT_KEY_MAX, "%04d-%02d-%02dT%02d:%02d:%02d", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
             tm.tm_hour, tm.tm_min, tm.tm_sec);
}

void schedule_slot_id(const char *name, const char *key, char out[ID_LEN + 1]) {
    uuid_t ns, id;
    if (uuid_parse(SCHEDULE_ID_NAMESPACE, ns) != 0) abort(); /* a constant: cannot happen */
    size_t nlen = strlen(name), klen = strlen(key);
    char *text = xmalloc(nlen + 1 + klen);
    memcpy(text, name, nlen);
    text[nlen] = '\n';
    memcpy(text + nlen + 1, key, klen);
    uuid_generate_sha1(id, ns, text, nlen + 1 + klen);
    free(text);
    uuid_unparse_lower(id, out);
}

#define SLOT_MARK "{{slot}}"

/* s with every SLOT_MARK replaced by slot_text: a new string (xmalloc). */
static char *replace_mark(const char *s, const char *slot_text) {
    size_t mark = strlen(SLOT_MARK), with = strlen(slot_text), count = 0;
    for (const char *p = strstr(s, SLOT_MARK); p; p = strstr(p + mark, SLOT_MARK)) count++;
    char *out = xmalloc(strlen(s) + count * with + 1), *o = out;
    for (const char *p; (p = strstr(s, SLOT_MARK)); s = p + mark) {
        memcpy(o, s, (size_t)(p - s));
        o += p - s;
        memcpy(o, slot_text, with);
        o += with;
    }
    strcpy(o, s);
    return out;
}

/* Replaces the mark in every string under item (object members, array items). */
static void substitute(cJSON *item, const char *slot_text) {
    if (cJSON_IsString(item) && strstr(item->valuestring, SLOT_MARK)) {
        char *v = replace_mark(item->valuestring, slot_text);
        if (!cJSON_SetValuestring(item, v)) abort(); /* out of memory: as xmalloc */
        free(v);
        return;
    }
    for (cJSON *child = item->child; child && (cJSON_IsObject(item) || cJSON_IsArray(item)); child = child->next)
        substitute(child, slot_text);
}

cJSON *schedule_payload(const struct cfg_schedule *s, const char *slot_text) {
    cJSON *payload = cJSON_Parse(s->payload ? s->payload : "{}");
    if (payload) substitute(payload, slot_text);
    return payload;
}

int64_t schedule_every_next(int64_t every_s, int64_t after) {
    int64_t q = after / every_s;
    if (after % every_s != 0 && after < 0) q--; /* floor, not truncation */
    return (q + 1) * every_s;
}

#define TZ_DIR "/usr/share/zoneinfo/"

bool tz_known(const char *zone) {
    size_t len = zone ? strlen(zone) : 0;
    if (len == 0 || len > 63 || zone[0] == '/' || strstr(zone, "..")) return false;
    for (const char *p = zone; *p; p++)
        if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_' ||
              *p == '+' || *p == '-' || *p == '/'))
            return false;
    char path[sizeof TZ_DIR + 64];
    snprintf(path, sizeof path, TZ_DIR "%s", zone);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    char magic[4];
    ssize_t n = read(fd, magic, sizeof magic);
    close(fd);
    return n == 4 && memcmp(magic, "TZif", 4) == 0;
}
