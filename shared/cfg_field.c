/* cfg_field.c - the members of one group of queues.conf's lists, read and
 * checked one by one (cfg_field.h). */
#include "cfg_field.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int field_refuse(struct field_reader *r, const char *member, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->why, r->n, fmt, ap);
    va_end(ap);
    const config_setting_t *m = member ? config_setting_get_member(r->g, member) : NULL;
    *r->where = m ? m : r->g;
    return CV_ECONFIG;
}

int field_string(struct field_reader *r, const char *name, const char **out) {
    const config_setting_t *m = config_setting_get_member(r->g, name);
    *out = NULL;
    if (!m) return 0;
    if (config_setting_type(m) != CONFIG_TYPE_STRING || !*config_setting_get_string(m))
        return field_refuse(r, name, "'%s' must be a non-empty string", name);
    *out = config_setting_get_string(m);
    return 0;
}

int field_duration(struct field_reader *r, const char *name, int64_t *out) {
    const char *v;
    if (field_string(r, name, &v) < 0) return CV_ECONFIG;
    if (!v) return 0;
    int64_t s;
    if (!duration_parse(v, &s) || s < 1 || s > 366LL * 86400)
        return field_refuse(r, name, "'%s' must be a duration of 1s to 366d such as \"90s\", \"15m\", \"1h\" or "
                                     "\"2d\" (got \"%s\")", name, v);
    *out = s;
    return 0;
}

int field_int(struct field_reader *r, const char *name, long lo, long hi, long *out) {
    const config_setting_t *m = config_setting_get_member(r->g, name);
    if (!m) return 0;
    int t = config_setting_type(m);
    long long v = t == CONFIG_TYPE_INT     ? config_setting_get_int(m)
                  : t == CONFIG_TYPE_INT64 ? config_setting_get_int64(m)
                                           : 0;
    if ((t != CONFIG_TYPE_INT && t != CONFIG_TYPE_INT64) || v < lo || v > hi)
        return field_refuse(r, name, "'%s' must be an integer from %ld to %ld", name, lo, hi);
    *out = (long)v;
    return 0;
}

bool field_name_ok(const char *s) {
    size_t len = strlen(s);
    if (len == 0 || len >= CFG_NAME_MAX) return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && *s != '_' && *s != '-' && *s != '.') return false;
    return true;
}
