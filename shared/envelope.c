/* envelope.c - the command envelope: parse and check (docs/contract.md, "The command envelope"). */
#include "core.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* True when a JSON string escape \u0000 occurs in text (escapes only occur inside strings). */
static bool has_escaped_nul(const char *s, size_t len) {
    for (size_t i = 0; i + 1 < len; i++) {
        if (s[i] != '\\') continue;
        if (s[i + 1] == 'u' && i + 5 < len && memcmp(s + i + 2, "0000", 4) == 0) return true;
        i++; /* skip the escaped character */
    }
    return false;
}

/* True when the string member `name` of the top-level object in text holds
 * \u0000. cJSON hands strings back cut at that character, so a string of
 * text with every \u0000 escape turned into \u0001 is parsed again: the
 * member differs there exactly when it, or a key cut into its name, held
 * one. Only called when text holds the escape somewhere (has_escaped_nul). */
static bool member_has_nul(const char *text, size_t len, const cJSON *root, const char *name) {
    const cJSON *cut = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!cJSON_IsString(cut)) return false;
    char *copy = xmalloc(len);
    memcpy(copy, text, len);
    for (size_t i = 0; i + 5 < len; i++) {
        if (copy[i] != '\\') continue;
        if (copy[i + 1] == 'u' && memcmp(copy + i + 2, "0000", 4) == 0) copy[i + 5] = '1';
        i++; /* skip the escaped character */
    }
    cJSON *whole = cJSON_ParseWithLength(copy, len);
    const cJSON *full = cJSON_GetObjectItemCaseSensitive(whole, name);
    bool nul = !cJSON_IsString(full) || strcmp(full->valuestring, cut->valuestring) != 0;
    cJSON_Delete(whole);
    free(copy);
    return nul;
}

static int dead(char *err, size_t errlen, const char *fmt, const char *arg) {
    snprintf(err, errlen, fmt, arg);
    return CV_EDEAD;
}

static void field_error(struct envelope *e, const char *field, const char *reason) {
    if (!e->field_errors) e->field_errors = cJSON_CreateObject();
    cJSON_AddStringToObject(e->field_errors, field, reason);
}

int envelope_parse(const char *body, size_t len, size_t max_bytes, const char *fallback_id,
                   struct envelope *e, char *err, size_t errlen) {
    memset(e, 0, sizeof *e);
    e->created_ms = -1;
    if (len > max_bytes) {
        snprintf(err, errlen, "message is %zu bytes, over the limit of %zu", len, max_bytes);
        return CV_EDEAD;
    }
    if (!utf8_valid(body, len)) return dead(err, errlen, "%s", "message is not valid UTF-8");
    if (memchr(body, '\0', len)) return dead(err, errlen, "%s", "message contains a NUL byte");
    const char *why = NULL;
    if (!json_check(body, len, JSON_MAX_DEPTH, &why)) {
        snprintf(err, errlen, "message is not valid JSON: %s", why);
        return CV_EDEAD;
    }
    e->root = cJSON_ParseWithLength(body, len);
    if (!e->root) return dead(err, errlen, "%s", "message is not valid JSON");
    if (!cJSON_IsObject(e->root)) {
        envelope_free(e);
        return dead(err, errlen, "%s", "message is not a JSON object");
    }
    e->has_nul = has_escaped_nul(body, len);
    /* an id or type cut at a \u0000 would name another command (its id would
     * then be taken, and the real command dropped as a duplicate) */
    if (e->has_nul && (member_has_nul(body, len, e->root, "id") || member_has_nul(body, len, e->root, "type"))) {
        envelope_free(e);
        return dead(err, errlen, "%s", "'id' or 'type' holds a NUL character (\\u0000)");
    }

    const cJSON *id = cJSON_GetObjectItemCaseSensitive(e->root, "id");
    if (id && !cJSON_IsNull(id)) {
        if (!cJSON_IsString(id) || !id_parse(id->valuestring, e->id)) {
            envelope_free(e);
            return dead(err, errlen, "%s", "'id' must be a UUID string");
        }
    } else if (!fallback_id || !id_parse(fallback_id, e->id)) {
        envelope_free(e);
        return dead(err, errlen, "%s", "'id' is missing");
    }

    const cJSON *type = cJSON_GetObjectItemCaseSensitive(e->root, "type");
    if (!cJSON_IsString(type) || !type->valuestring[0]) {
        envelope_free(e);
        return dead(err, errlen, "%s", "'type' is missing or not a non-empty string");
    }
    if (strlen(type->valuestring) >= sizeof e->type) {
        envelope_free(e);
        return dead(err, errlen, "%s", "'type' is longer than 63 bytes");
    }
    snprintf(e->type, sizeof e->type, "%s", type->valuestring);

    e->payload = cJSON_GetObjectItemCaseSensitive(e->root, "payload");
    if (!cJSON_IsObject(e->payload)) {
        envelope_free(e);
        return dead(err, errlen, "%s", "'payload' is missing or not an object");
    }

    const cJSON *corr = cJSON_GetObjectItemCaseSensitive(e->root, "correlationId");
    if (corr && !cJSON_IsNull(corr)) {
        if (!cJSON_IsString(corr)) field_error(e, "correlationId", "must be a string");
        else if (utf8_chars(corr->valuestring) > 200) field_error(e, "correlationId", "must be at most 200 characters");
        else e->correlation_id = corr->valuestring;
    }
    const cJSON *created = cJSON_GetObjectItemCaseSensitive(e->root, "createdAt");
    if (created && !cJSON_IsNull(created)) {
        e->created_ms = -1; /* kept when not valid */
        if (cJSON_IsString(created)) (void)clock_rfc3339_ms(created->valuestring, &e->created_ms);
        if (e->created_ms < 0) field_error(e, "createdAt", "must be an RFC 3339 date-time");
        else e->created_at = created->valuestring;
    }
    /* a time with its offset: a local time without one would mean another
     * instant on each host (clock_rfc3339_ms takes only such times) */
    const cJSON *not_before = cJSON_GetObjectItemCaseSensitive(e->root, "notBefore");
    if (not_before && !cJSON_IsNull(not_before)) {
        int64_t ms;
        if (!cJSON_IsString(not_before) || !clock_rfc3339_ms(not_before->valuestring, &ms))
            field_error(e, "notBefore", "must be an RFC 3339 date-time with an offset");
        else e->not_before = not_before->valuestring;
    }
    /* lanes (docs/contract.md, "Lanes"): how a command is served, never whether */
    e->priority = LANE_NORMAL;
    const cJSON *prio = cJSON_GetObjectItemCaseSensitive(e->root, "priority");
    if (prio && !cJSON_IsNull(prio)) {
        int cls = LANE_NORMAL;
        if (!cJSON_IsString(prio) || !lane_class_parse(prio->valuestring, &cls))
            field_error(e, "priority", "must be \"high\", \"normal\" or \"low\"");
        else e->priority = (enum lane_class)cls;
    }
    static const char *const key_fields[] = {"fairnessKey", "orderingKey"};
    for (int i = 0; i < 2; i++) {
        const cJSON *k = cJSON_GetObjectItemCaseSensitive(e->root, key_fields[i]);
        if (!k || cJSON_IsNull(k)) continue;
        if (!cJSON_IsString(k) || !k->valuestring[0]) field_error(e, key_fields[i], "must be a non-empty string");
        else if (utf8_chars(k->valuestring) > LANE_KEY_CHARS)
            field_error(e, key_fields[i], "must be at most 200 characters");
        else if (i == 0) e->fairness_key = k->valuestring;
        else e->ordering_key = k->valuestring;
    }
    /* best effort: a traceparent that is not a valid one is ignored (a header may give one) */
    const cJSON *traceparent = cJSON_GetObjectItemCaseSensitive(e->root, "traceparent");
    if (cJSON_IsString(traceparent)) trace_parse(traceparent->valuestring, &e->trace, &e->trace_ignored);
    else if (traceparent && !cJSON_IsNull(traceparent)) e->trace_ignored = "not a string";
    return 0;
}

void envelope_trace_header(struct envelope *e, const char *traceparent) {
    const char *why = NULL;
    if (!e->trace.trace_id[0] && traceparent) trace_parse(traceparent, &e->trace, &why);
    /* logged now, so that the line carries the traceId the header may have given */
    if (e->trace_ignored) log_cmd(LOG_DEBUG, e, "traceparent ignored (envelope field): %s", e->trace_ignored);
    if (why) log_cmd(LOG_DEBUG, e, "traceparent ignored (header): %s", why);
    e->trace_ignored = NULL;
}

void envelope_free(struct envelope *e) {
    if (!e) return;
    cJSON_Delete(e->root);
    cJSON_Delete(e->field_errors);
    memset(e, 0, sizeof *e);
}

char *envelope_build(const char *id, const char *type, const cJSON *payload,
                     const char *correlation_id, const char *created_at, const char *not_before) {
    char idbuf[ID_LEN + 1], ts[32];
    if (!id) { id_new(idbuf); id = idbuf; }
    if (!created_at) { clock_rfc3339(clock_ms(), ts); created_at = ts; }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", id);
    cJSON_AddStringToObject(o, "type", type);
    cJSON_AddItemToObject(o, "payload", cJSON_Duplicate(payload, 1));
    if (correlation_id) cJSON_AddStringToObject(o, "correlationId", correlation_id);
    cJSON_AddStringToObject(o, "createdAt", created_at);
    if (not_before) cJSON_AddStringToObject(o, "notBefore", not_before);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

int envelope_mask_secrets(cJSON *command) {
    static const char *const secret[] = {"password", "currentPassword", "newPassword"};
    cJSON *payload = cJSON_GetObjectItemCaseSensitive(command, "payload");
    int n = 0;
    for (size_t i = 0; cJSON_IsObject(payload) && i < sizeof secret / sizeof secret[0]; i++)
        if (cJSON_GetObjectItemCaseSensitive(payload, secret[i])) {
            cJSON_ReplaceItemInObjectCaseSensitive(payload, secret[i], cJSON_CreateString("***"));
            n++;
        }
    return n;
}
