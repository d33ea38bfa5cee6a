/* cfg_rate_limits.c - one rate limit of queues.conf's `rate_limits` list, read
 * and checked field by field (cfg.c walks the list, refuses unknown settings,
 * duplicate names, an unrouted type and a type counted by two limits, gives a
 * queue's limit the queue's commands, and makes the message). */
#include "cfg_field.h"

#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RATE_MAX_PER_S 1e6
#define BURST_MAX 10000000L
#define SHARDS_DEFAULT 8 /* a limit without a key: rows its bucket is split into, at most burst */

/* "N/s", "N/min", "N/h" (N a positive number, "sec", "second", "m", "minute",
 * "hour" too) into tokens per second. Returns false when it is not one. */
static bool rate_parse(const char *s, double *per_s) {
    char *end;
    double n = strtod(s, &end);
    if (end == s || !isdigit((unsigned char)*s) || !(n > 0) || *end != '/') return false;
    const char *unit = end + 1;
    double secs = 0;
    if (!strcmp(unit, "s") || !strcmp(unit, "sec") || !strcmp(unit, "second")) secs = 1;
    else if (!strcmp(unit, "m") || !strcmp(unit, "min") || !strcmp(unit, "minute")) secs = 60;
    else if (!strcmp(unit, "h") || !strcmp(unit, "hour")) secs = 3600;
    if (!secs) return false;
    *per_s = n / secs;
    return *per_s <= RATE_MAX_PER_S;
}

/* "payload.a.b": the path after "payload.", each part letters, digits, '_' or '-'. */
static bool key_ok(const char *s) {
    if (strncmp(s, "payload.", 8) != 0 || !s[8] || strlen(s) >= 200) return false;
    bool part = false;
    for (const char *p = s + 8; *p; p++) {
        if (*p == '.') {
            if (!part) return false;
            part = false;
        } else if (isalnum((unsigned char)*p) || *p == '_' || *p == '-') {
            part = true;
        } else {
            return false;
        }
    }
    return part;
}

void cfg_rate_limit_add_type(struct cfg_rate_limit *rl, const char *type) {
    rl->types = xrealloc(rl->types, (size_t)(rl->ntypes + 1) * sizeof *rl->types);
    rl->types[rl->ntypes++] = xstrdup(type);
}

/* types = [...] or queue = "name": exactly one (cfg.c checks the routing, and
 * gives a queue's limit its commands). */
static int read_types(struct field_reader *r, struct cfg_rate_limit *rl) {
    const config_setting_t *types = config_setting_get_member(r->g, "types");
    const char *queue;
    if (field_string(r, "queue", &queue) < 0) return CV_ECONFIG;
    if (types && queue) return field_refuse(r, "queue", "'types' and 'queue' are both set: a limit counts one of them");
    if (!types && !queue) return field_refuse(r, NULL, "'types' (a list of command types) or 'queue' is required");
    if (queue) {
        if (strlen(queue) >= sizeof rl->queue) return field_refuse(r, "queue", "'queue' \"%s\" is too long", queue);
        snprintf(rl->queue, sizeof rl->queue, "%s", queue);
        return 0;
    }
    int kind = config_setting_type(types);
    if ((kind != CONFIG_TYPE_ARRAY && kind != CONFIG_TYPE_LIST) || config_setting_length(types) == 0)
        return field_refuse(r, "types", "'types' must be a list of command types, such as [\"placeOrder\"]");
    for (int i = 0; i < config_setting_length(types); i++) {
        const config_setting_t *e = config_setting_get_elem(types, (unsigned)i);
        const char *t = config_setting_type(e) == CONFIG_TYPE_STRING ? config_setting_get_string(e) : NULL;
        if (!t || !*t) return field_refuse(r, "types", "'types' must hold non-empty strings");
        for (int j = 0; j < rl->ntypes; j++)
            if (!strcmp(rl->types[j], t)) return field_refuse(r, "types", "'types' lists \"%s\" twice", t);
        cfg_rate_limit_add_type(rl, t);
    }
    return 0;
}

/* rate, burst, key, over, shards. */
static int read_bucket(struct field_reader *r, struct cfg_rate_limit *rl) {
    const char *rate, *key, *over;
    if (field_string(r, "rate", &rate) < 0) return CV_ECONFIG;
    if (!rate) return field_refuse(r, NULL, "'rate' is required, such as \"100/s\", \"6000/min\" or \"10/h\"");
    if (strlen(rate) >= sizeof rl->rate_text || !rate_parse(rate, &rl->rate))
        return field_refuse(r, "rate", "'rate' must be a number per second, minute or hour, such as \"100/s\", "
                                       "\"6000/min\" or \"10/h\", at most 1000000/s (got \"%s\")", rate);
    snprintf(rl->rate_text, sizeof rl->rate_text, "%s", rate);
    long burst = (long)ceil(rl->rate); /* one second's worth, and at least 1 */
    if (burst < 1) burst = 1;
    if (field_int(r, "burst", 1, BURST_MAX, &burst) < 0) return CV_ECONFIG;
    rl->burst = (double)burst;
    if (field_string(r, "key", &key) < 0 || field_string(r, "over", &over) < 0) return CV_ECONFIG;
    if (key && !key_ok(key))
        return field_refuse(r, "key", "'key' must be a payload field such as \"payload.customerId\" or "
                                      "\"payload.customer.id\" (letters, digits, '_' and '-' between dots; "
                                      "got \"%s\")", key);
    if (key) rl->key = xstrdup(key + 8);
    rl->over = RATE_OVER_WAIT;
    if (over && strcmp(over, "wait") != 0) {
        if (strcmp(over, "reject") != 0)
            return field_refuse(r, "over", "'over' must be \"wait\" or \"reject\" (got \"%s\")", over);
        rl->over = RATE_OVER_REJECT;
    }
    long shards = key ? 1 : (burst < SHARDS_DEFAULT ? burst : SHARDS_DEFAULT);
    if (field_int(r, "shards", 1, RATE_SHARDS_MAX, &shards) < 0) return CV_ECONFIG;
    if (shards > burst)
        return field_refuse(r, "shards", "'shards' (%ld) must not be above 'burst' (%ld): each row of the bucket "
                                         "holds burst/shards tokens, at least one", shards, burst);
    rl->shards = (int)shards;
    return 0;
}

int cfg_rate_limit_read(const config_setting_t *g, struct cfg_rate_limit *rl, char *why, size_t n,
                        const config_setting_t **where) {
    memset(rl, 0, sizeof *rl);
    struct field_reader r = {g, where, why, n};
    const char *name;
    if (field_string(&r, "name", &name) < 0) return CV_ECONFIG;
    if (!name) return field_refuse(&r, NULL, "'name' is required");
    if (!field_name_ok(name))
        return field_refuse(&r, "name", "'name' must be 1-63 letters, digits, '_', '-' or '.' (got \"%s\")", name);
    snprintf(rl->name, sizeof rl->name, "%s", name);
    if (read_types(&r, rl) < 0 || read_bucket(&r, rl) < 0) return CV_ECONFIG;
    return 0;
}

void cfg_rate_limit_free(struct cfg_rate_limit *rl) {
    if (!rl) return;
    for (int i = 0; i < rl->ntypes; i++) free(rl->types[i]);
    free(rl->types);
    free(rl->key);
    rl->types = NULL;
    rl->key = NULL;
    rl->ntypes = 0;
}

const struct cfg_rate_limit *cfg_rate_limit_for(const struct cfg *c, const char *type) {
    for (int i = 0; i < c->nrate_limits; i++)
        for (int j = 0; j < c->rate_limits[i].ntypes; j++)
            if (strcmp(c->rate_limits[i].types[j], type) == 0) return &c->rate_limits[i];
    return NULL;
}
