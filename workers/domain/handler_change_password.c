/* handler_change_password.c - changePassword: check the current password
 * against the argon2id hash, then store the hash of the new one. */
#include "domain.h"

#include <sodium.h>
#include <string.h>

int handle_change_password(struct cmd_ctx *ctx) {
    const cJSON *p = ctx->cmd->payload;
    struct verr v = {0};
    char user_id[ID_LEN + 1];
    const char *current = NULL, *next = NULL;
    v_uuid(&v, p, "userId", true, user_id);
    const cJSON *cur = cJSON_GetObjectItemCaseSensitive(p, "currentPassword");
    if (!cur || cJSON_IsNull(cur)) verr_add(&v, "currentPassword", "is required");
    else if (!cJSON_IsString(cur)) verr_add(&v, "currentPassword", "must be a string");
    else if (strlen(cur->valuestring) > 128) verr_add(&v, "currentPassword", "must be at most 128 bytes");
    else current = cur->valuestring;
    v_password(&v, p, "newPassword", true, &next);
    if (verr_any(&v) || !current || !next) return ctx_reject_invalid(ctx, &v); /* both set when nothing is wrong */
    if (ctx->validate_only) return 0;

    const char *params[2] = {user_id, NULL};
    PGresult *r;
    int rc = ctx_exec(ctx, "SELECT password_hash FROM users WHERE id = $1 FOR UPDATE", 1, params, &r);
    if (rc < 0) return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return ctx_reject(ctx, "NOT_FOUND", NULL, NULL, "user %s does not exist", user_id);
    }
    bool ok = crypto_pwhash_str_verify(PQgetvalue(r, 0, 0), current, strlen(current)) == 0;
    PQclear(r);
    if (!ok) return ctx_reject(ctx, "INVALID_CREDENTIALS", NULL, NULL, "the current password is not right");
    char hash[128];
    if ((rc = password_hash(ctx, next, hash)) < 0) return rc;
    params[1] = hash;
    rc = ctx_exec(ctx, "UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1", 2, params, NULL);
    sodium_memzero(hash, sizeof hash);
    if (rc < 0) return rc;
    cJSON *data = cJSON_CreateObject();
    cJSON_AddStringToObject(data, "userId", user_id);
    ctx_emit(ctx, "user.passwordChanged", "user", user_id, data);
    return 0;
}
