/* handler_register.c - register: a new user with an argon2id password hash,
 * its email stored lower-cased by PostgreSQL's lower(). */
#include "domain.h"

#include <sodium.h>
#include <stdlib.h>
#include <string.h>

int handle_register(struct cmd_ctx *ctx) {
    const cJSON *p = ctx->cmd->payload;
    struct verr v = {0};
    char *name = NULL, *email = NULL, user_id[ID_LEN + 1];
    const char *password = NULL;
    v_string(&v, p, "name", true, true, 1, 255, &name);
    v_email(&v, p, "email", true, &email);
    v_password(&v, p, "password", true, &password);
    if (v_uuid(&v, p, "userId", false, user_id) == V_ABSENT) id_new(user_id);
    int rc;
    if (verr_any(&v) || ctx->validate_only) {
        rc = verr_any(&v) ? ctx_reject_invalid(ctx, &v) : 0;
        goto out;
    }

    char hash[128];
    if ((rc = password_hash(ctx, password, hash)) < 0) goto out;
    const char *params[4] = {user_id, name, email, hash};
    PGresult *r;
    rc = ctx_exec(ctx,
                  /* lower() here, not in C: the users_email_check constraint
                   * (email = lower(email)) uses the same mapping, so they
                   * cannot disagree, whatever the letters (É -> é) */
                  "INSERT INTO users (id, name, email, password_hash) VALUES ($1, $2, lower($3), $4) "
                  "ON CONFLICT DO NOTHING RETURNING " SQL_RFC3339("created_at") ", email",
                  4, params, &r);
    sodium_memzero(hash, sizeof hash);
    if (rc < 0) goto out;
    if (PQntuples(r) == 0) {
        PQclear(r);
        rc = ctx_exec(ctx, "SELECT 1 FROM users WHERE id = $1", 1, params, &r);
        if (rc < 0) goto out;
        bool id_taken = PQntuples(r) > 0;
        PQclear(r);
        if (id_taken) rc = ctx_reject(ctx, "CONFLICT", NULL, NULL, "a user with id %s already exists", user_id);
        else rc = ctx_reject(ctx, "EMAIL_TAKEN", NULL, NULL, "the email address is already registered");
        goto out;
    }
    cJSON *data = cJSON_CreateObject();
    cJSON_AddStringToObject(data, "userId", user_id);
    cJSON_AddStringToObject(data, "name", name);
    cJSON_AddStringToObject(data, "email", PQgetvalue(r, 0, 1)); /* as stored */
    cJSON_AddStringToObject(data, "createdAt", PQgetvalue(r, 0, 0));
    PQclear(r);
    ctx_emit(ctx, "user.registered", "user", user_id, data);
    rc = 0;
out:
    verr_free(&v);
    free(name);
    free(email);
    return rc;
}
