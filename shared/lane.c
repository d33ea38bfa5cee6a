/* lane.c - lanes: the priority classes, the taking order with its guard
 * against starvation, and the lane key of a command (docs/contract.md,
 * "Lanes"). Pure: no broker, no database. The backends split a queue with
 * these (RabbitMQ: the sorter's routing key on the consistent-hash exchange;
 * Redis: the same rules in the take script, redis_scripts.c), the batch keeps
 * a retrying command's key held with lane_order_key. */
#include "core.h"

#include <cJSON.h>
#include <sodium.h>
#include <stdio.h>
#include <string.h>

static const char *const class_names[LANE_CLASSES] = {"high", "normal", "low"};

const char *lane_class_name(int cls) { return cls >= 0 && cls < LANE_CLASSES ? class_names[cls] : "normal"; }

const char *lane_label(int lanes, int k, char *out, size_t n) {
    snprintf(out, n, "%s.%d", lane_class_name(k / lanes), k % lanes);
    return out;
}

bool lane_class_parse(const char *s, int *cls) {
    for (int i = 0; s && i < LANE_CLASSES; i++)
        if (strcmp(s, class_names[i]) == 0) {
            *cls = i;
            return true;
        }
    return false;
}

void lane_take_order(unsigned long n, int order[LANE_CLASSES]) {
    if (n % LANE_GUARD_LOW == LANE_GUARD_LOW - 1) {
        order[0] = LANE_LOW, order[1] = LANE_NORMAL, order[2] = LANE_HIGH;
    } else if (n % LANE_GUARD_NORMAL == LANE_GUARD_NORMAL - 1) {
        order[0] = LANE_NORMAL, order[1] = LANE_HIGH, order[2] = LANE_LOW;
    } else {
        order[0] = LANE_HIGH, order[1] = LANE_NORMAL, order[2] = LANE_LOW;
    }
}

/* The text of an aggregate field's value into out: a string as it is, an
 * integer in decimal; false for anything else (no key). */
static bool key_text(const cJSON *v, char *out, size_t n) {
    if (cJSON_IsString(v) && v->valuestring[0]) {
        snprintf(out, n, "%s", v->valuestring);
        return strlen(v->valuestring) < n;
    }
    if (cJSON_IsNumber(v) && v->valuedouble == (double)(long long)v->valuedouble) {
        snprintf(out, n, "%lld", (long long)v->valuedouble);
        return true;
    }
    return false;
}

/* The aggregate field of TYPE in q, or NULL. */
static const char *order_field(const struct cfg_queue *q, const char *type) {
    for (int i = 0; q->order_fields && type && i < q->ncommands; i++)
        if (strcmp(q->commands[i], type) == 0) return q->order_fields[i];
    return NULL;
}

/* key_text of the member NAME of obj, or of the aggregate field of payload;
 * a value too long for out is hashed (hex) so that equal keys stay equal. */
static bool member_key(const cJSON *obj, const char *name, char *out, size_t n) {
    const cJSON *v = name ? cJSON_GetObjectItemCaseSensitive(obj, name) : NULL;
    if (!v) return false;
    if (key_text(v, out, n)) return true;
    if (!cJSON_IsString(v) || !v->valuestring[0]) return false;
    unsigned char h[16];
    crypto_generichash(h, sizeof h, (const unsigned char *)v->valuestring, strlen(v->valuestring), NULL, 0);
    size_t k = 0;
    for (size_t i = 0; i < sizeof h && k + 3 <= n; i++) k += (size_t)snprintf(out + k, n - k, "%02x", h[i]);
    return true;
}

void lane_route(const struct cfg_queue *q, const char *body, size_t len, const char *fallback_id,
                struct lane_route *out) {
    out->cls = LANE_NORMAL;
    out->key[0] = '\0';
    out->created_ms = 0;
    cJSON *root = body ? cJSON_ParseWithLength(body, len) : NULL;
    if (!cJSON_IsObject(root)) {
        if (fallback_id) snprintf(out->key, sizeof out->key, "%s", fallback_id);
        cJSON_Delete(root);
        return;
    }
    const cJSON *prio = cJSON_GetObjectItemCaseSensitive(root, "priority");
    if (cJSON_IsString(prio)) (void)lane_class_parse(prio->valuestring, &out->cls);
    const cJSON *at = cJSON_GetObjectItemCaseSensitive(root, "createdAt");
    int64_t ms = 0;
    if (cJSON_IsString(at) && clock_rfc3339_ms(at->valuestring, &ms) && ms > 0) out->created_ms = ms;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "type");
    const cJSON *payload = cJSON_GetObjectItemCaseSensitive(root, "payload");
    if (!member_key(root, "fairnessKey", out->key, sizeof out->key) &&
        !member_key(root, "orderingKey", out->key, sizeof out->key) &&
        !(cJSON_IsObject(payload) &&
          member_key(payload, order_field(q, cJSON_IsString(type) ? type->valuestring : NULL), out->key,
                     sizeof out->key)) &&
        !member_key(root, "id", out->key, sizeof out->key) && fallback_id)
        snprintf(out->key, sizeof out->key, "%s", fallback_id);
    cJSON_Delete(root);
}

const char *lane_order_key(const struct cfg_queue *q, const struct envelope *e, char *out, size_t n) {
    out[0] = '\0';
    if (e->ordering_key && member_key(e->root, "orderingKey", out, n)) return out;
    if (!member_key(e->payload, order_field(q, e->type), out, n)) out[0] = '\0';
    return out;
}
