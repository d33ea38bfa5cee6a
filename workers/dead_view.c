/* dead_view.c - a dead letter as an operator sees it (conveyor-admin and the
 * dashboard): its command id, a key that names it while it waits, its age,
 * its JSON with the message's secrets masked, and the reset of its attempt
 * count before a retry.
 */
#include "workers.h"

#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void dead_letter_command_id(const struct dead_letter *d, char out[ID_LEN + 1]) {
    out[0] = '\0';
    cJSON *o = cJSON_ParseWithLength(d->body, d->len);
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id");
    if (!(cJSON_IsString(id) && id_parse(id->valuestring, out)) && d->message_id) id_parse(d->message_id, out);
    cJSON_Delete(o);
}

void dead_letter_key(const struct dead_letter *d, char out[DEAD_KEY_LEN + 1]) {
    dead_letter_command_id(d, out);
    if (out[0]) return;
    unsigned char h[8];
    crypto_generichash(h, sizeof h, (const unsigned char *)d->body, d->len, NULL, 0);
    memcpy(out, "body-", 5);
    sodium_bin2hex(out + 5, DEAD_KEY_LEN + 1 - 5, h, sizeof h);
}

long dead_letter_age_s(const struct dead_letter *d) {
    int64_t at = d->failed_at ? clock_rfc3339_ms(d->failed_at) : -1;
    return at < 0 ? -1 : (long)((clock_ms() - at) / 1000);
}

/* The message's "type", or "-" (owned by the caller). */
static char *type_of(const struct dead_letter *d) {
    cJSON *o = cJSON_ParseWithLength(d->body, d->len);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "type");
    char *s = xstrdup(cJSON_IsString(t) ? t->valuestring : "-");
    cJSON_Delete(o);
    return s;
}

cJSON *dead_letter_json(const struct cfg_queue *q, const struct dead_letter *d, int index, bool message) {
    char id[ID_LEN + 1], key[DEAD_KEY_LEN + 1];
    dead_letter_command_id(d, id);
    dead_letter_key(d, key);
    char *type = type_of(d);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "queue", q->name);
    cJSON_AddNumberToObject(o, "index", index);
    cJSON_AddStringToObject(o, "key", key);
    if (id[0]) cJSON_AddStringToObject(o, "commandId", id);
    else cJSON_AddNullToObject(o, "commandId");
    cJSON_AddStringToObject(o, "type", type);
    cJSON_AddStringToObject(o, "reason", d->reason ? d->reason : "");
    cJSON_AddStringToObject(o, "error", d->error ? d->error : "");
    cJSON_AddNumberToObject(o, "attempts", d->attempts);
    cJSON_AddStringToObject(o, "failedAt", d->failed_at ? d->failed_at : "");
    cJSON_AddNumberToObject(o, "ageSeconds", (double)dead_letter_age_s(d));
    if (message) {
        cJSON *m = utf8_valid(d->body, d->len) ? cJSON_ParseWithLength(d->body, d->len) : NULL;
        if (m && envelope_mask_secrets(m) > 0) { /* shown masked; kept and retried untouched */
            char *masked = cJSON_PrintUnformatted(m);
            cJSON_AddStringToObject(o, "message", masked ? masked : "(out of memory)");
            free(masked);
        } else if (utf8_valid(d->body, d->len) && !memchr(d->body, '\0', d->len)) {
            cJSON_AddStringToObject(o, "message", d->body);
        } else cJSON_AddStringToObject(o, "message", "(not UTF-8: use the broker's own tools to read the bytes)");
        cJSON_Delete(m);
    }
    free(type);
    return o;
}

int dead_letter_reset_attempts(struct db *db, const struct dead_letter *d) {
    char id[ID_LEN + 1];
    dead_letter_command_id(d, id);
    if (!id[0]) return 0;
    const char *p[1] = {id};
    return db_exec(db, "DELETE FROM command_attempts WHERE id = $1", 1, p, NULL);
}
