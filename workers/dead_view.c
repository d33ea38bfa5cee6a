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

/* d's body as JSON, or NULL when it is not (caller frees). */
static cJSON *parse(const struct dead_letter *d) { return cJSON_ParseWithLength(d->body, d->len); }

/* The command id of d, whose body parsed as o (NULL: not JSON). */
static void id_of(const cJSON *o, const struct dead_letter *d, char out[ID_LEN + 1]) {
    out[0] = '\0';
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(o, "id");
    if (!(cJSON_IsString(id) && id_parse(id->valuestring, out)) && d->message_id) id_parse(d->message_id, out);
}

/* d's key from its command id (id, "" when none). */
static void key_of(const char *id, const struct dead_letter *d, char out[DEAD_KEY_LEN + 1]) {
    if (id[0]) {
        snprintf(out, DEAD_KEY_LEN + 1, "%s", id);
        return;
    }
    unsigned char h[8];
    crypto_generichash(h, sizeof h, (const unsigned char *)d->body, d->len, NULL, 0);
    memcpy(out, "body-", 5);
    sodium_bin2hex(out + 5, DEAD_KEY_LEN + 1 - 5, h, sizeof h);
}

void dead_letter_command_id(const struct dead_letter *d, char out[ID_LEN + 1]) {
    cJSON *o = parse(d);
    id_of(o, d, out);
    cJSON_Delete(o);
}

void dead_letter_key(const struct dead_letter *d, char out[DEAD_KEY_LEN + 1]) {
    char id[ID_LEN + 1];
    dead_letter_command_id(d, id);
    key_of(id, d, out);
}

long dead_letter_age_s(const struct dead_letter *d) {
    int64_t at = -1; /* kept when absent or not valid */
    if (d->failed_at) (void)clock_rfc3339_ms(d->failed_at, &at);
    return at < 0 ? -1 : (long)((clock_ms() - at) / 1000);
}

cJSON *dead_letter_json(const struct cfg_queue *q, const struct dead_letter *d, int index, bool message) {
    cJSON *m = parse(d); /* once: its id, its type, and the message masked */
    char id[ID_LEN + 1], key[DEAD_KEY_LEN + 1];
    id_of(m, d, id);
    key_of(id, d, key);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(m, "type");
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "queue", q->name);
    cJSON_AddNumberToObject(o, "index", index);
    cJSON_AddStringToObject(o, "key", key);
    json_add_optional(o, "commandId", id[0] ? id : NULL);
    cJSON_AddStringToObject(o, "type", cJSON_IsString(type) ? type->valuestring : "-");
    cJSON_AddStringToObject(o, "reason", d->reason ? d->reason : "");
    cJSON_AddStringToObject(o, "error", d->error ? d->error : "");
    cJSON_AddNumberToObject(o, "attempts", d->attempts);
    cJSON_AddStringToObject(o, "failedAt", d->failed_at ? d->failed_at : "");
    cJSON_AddNumberToObject(o, "ageSeconds", (double)dead_letter_age_s(d));
    if (message) {
        bool utf8 = utf8_valid(d->body, d->len), text = utf8 && !memchr(d->body, '\0', d->len);
        if (utf8 && m && envelope_mask_secrets(m) > 0) { /* shown masked; kept and retried untouched */
            char *masked = cJSON_PrintUnformatted(m);
            cJSON_AddStringToObject(o, "message", masked ? masked : "(out of memory)");
            free(masked);
        } else if (text) {
            cJSON_AddStringToObject(o, "message", d->body);
        } else cJSON_AddStringToObject(o, "message", "(not UTF-8: use the broker's own tools to read the bytes)");
    }
    cJSON_Delete(m);
    return o;
}

int dead_letter_reset_attempts(struct db *db, const struct dead_letter *d) {
    char id[ID_LEN + 1];
    dead_letter_command_id(d, id);
    if (!id[0]) return 0;
    const char *p[1] = {id};
    return db_exec(db, "DELETE FROM command_attempts WHERE id = $1", 1, p, NULL);
}
