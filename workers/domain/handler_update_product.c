/* handler_update_product.c - updateProduct: a partial update; product.updated
 * lists only the fields whose value really changed. ARCHIVED is final: an
 * archived product cannot be updated at all. */
#include "domain.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const statuses[] = {"DRAFT", "ACTIVE", "INACTIVE", "ARCHIVED", NULL};
/* fields an explicit null cannot clear (description and category can) */
static const char *const not_clearable[] = {"name", "price", "status", NULL};

/* Equal as optional strings (NULL is "no value"). */
static bool same(const char *a, const char *b) {
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

/* Long on purpose: each of the five optional fields is checked, compared with
 * the locked row and added to `changed` in the same few lines, field by field. */
int handle_update_product(struct cmd_ctx *ctx) {
    const cJSON *p = ctx->cmd->payload;
    struct verr v = {0};
    char product_id[ID_LEN + 1], price[32] = "";
    char *name = NULL, *description = NULL, *category = NULL, *status = NULL;
    v_uuid(&v, p, "productId", true, product_id);
    for (const char *const *f = not_clearable; *f; f++)
        if (cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(p, *f)))
            verr_add(&v, *f, "cannot be null (only description and category can be cleared)");
    /* present (valid or not) unless V_ABSENT */
    enum v_result has_name = v_string(&v, p, "name", false, true, 1, 255, &name);
    enum v_result has_price = v_price(&v, p, "price", false, price);
    enum v_result has_desc = v_string(&v, p, "description", false, false, 0, 10000, &description);
    enum v_result has_cat = v_string(&v, p, "category", false, true, 0, 100, &category);
    enum v_result has_status = v_string(&v, p, "status", false, false, 1, 16, &status);
    /* description and category may be cleared with an explicit null */
    bool clear_desc = cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(p, "description"));
    bool clear_cat = cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(p, "category"));
    if (has_status == V_VALID) {
        bool known = false;
        for (const char *const *s = statuses; *s; s++) known |= strcmp(*s, status) == 0;
        if (!known) verr_add(&v, "status", "must be DRAFT, ACTIVE, INACTIVE or ARCHIVED");
    }
    if (!has_name && !has_price && !has_desc && !has_cat && !has_status && !clear_desc && !clear_cat &&
        !verr_any(&v))
        verr_add(&v, "payload", "must change at least one of name, description, price, category, status");
    int rc;
    if (verr_any(&v) || ctx->validate_only) {
        rc = verr_any(&v) ? ctx_reject_invalid(ctx, &v) : 0;
        goto out;
    }
    const char *params[6] = {product_id};
    PGresult *r;
    rc = ctx_exec(ctx, "SELECT name, description, price::text, category, status FROM products "
                       "WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", 1, params, &r);
    if (rc < 0) goto out;
    if (PQntuples(r) == 0) {
        PQclear(r);
        rc = ctx_reject(ctx, "NOT_FOUND", NULL, NULL, "product %s does not exist", product_id);
        goto out;
    }
    const char *old_name = PQgetvalue(r, 0, 0), *old_price = PQgetvalue(r, 0, 2), *old_status = PQgetvalue(r, 0, 4);
    const char *old_desc = PQgetisnull(r, 0, 1) ? NULL : PQgetvalue(r, 0, 1);
    const char *old_cat = PQgetisnull(r, 0, 3) ? NULL : PQgetvalue(r, 0, 3);
    if (strcmp(old_status, "ARCHIVED") == 0) {
        PQclear(r);
        rc = ctx_reject(ctx, "CONFLICT", NULL, NULL, "product %s is archived; archived products are final", product_id);
        goto out;
    }
    const char *new_name = has_name > 0 ? name : old_name;
    const char *new_price = has_price > 0 ? price : old_price;
    const char *new_desc = has_desc > 0 ? description : clear_desc ? NULL : old_desc;
    const char *new_cat = has_cat > 0 ? category : clear_cat ? NULL : old_cat;
    const char *new_status = has_status > 0 ? status : old_status;
    cJSON *changed = cJSON_CreateObject();
    if (!same(new_name, old_name)) cJSON_AddStringToObject(changed, "name", new_name);
    if (!same(new_desc, old_desc)) json_add_optional(changed, "description", new_desc);
    if (!same(new_price, old_price)) cJSON_AddStringToObject(changed, "price", new_price);
    if (!same(new_cat, old_cat)) json_add_optional(changed, "category", new_cat);
    if (!same(new_status, old_status)) cJSON_AddStringToObject(changed, "status", new_status);
    if (cJSON_GetArraySize(changed) > 0) {
        const char *up[6] = {product_id, new_name, new_desc, new_price, new_cat, new_status};
        rc = ctx_exec(ctx, "UPDATE products SET name = $2, description = $3, price = $4, category = $5, "
                           "status = $6, updated_at = now() WHERE id = $1", 6, up, NULL);
    }
    PQclear(r);
    if (rc < 0) {
        cJSON_Delete(changed);
        goto out;
    }
    cJSON *data = cJSON_CreateObject();
    cJSON_AddStringToObject(data, "productId", product_id);
    cJSON_AddItemToObject(data, "changed", changed);
    ctx_emit(ctx, "product.updated", "product", product_id, data);
    rc = 0;
out:
    verr_free(&v);
    free(name);
    free(description);
    free(category);
    free(status);
    return rc;
}
