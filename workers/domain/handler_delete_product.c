/* handler_delete_product.c - deleteProduct: a soft delete, so that orders
 * already placed keep their items and prices. */
#include "domain.h"

int handle_delete_product(struct cmd_ctx *ctx) {
    struct verr v = {0};
    char product_id[ID_LEN + 1];
    v_uuid(&v, ctx->cmd->payload, "productId", true, product_id);
    if (verr_any(&v)) return ctx_reject_invalid(ctx, &v);
    if (ctx->validate_only) return 0;
    const char *params[1] = {product_id};
    PGresult *r;
    int rc = ctx_exec(ctx, "UPDATE products SET deleted_at = now(), updated_at = now() "
                           "WHERE id = $1 AND deleted_at IS NULL RETURNING id", 1, params, &r);
    if (rc < 0) return rc;
    int n = PQntuples(r);
    PQclear(r);
    if (n == 0) return ctx_reject(ctx, "NOT_FOUND", NULL, NULL, "product %s does not exist", product_id);
    cJSON *data = cJSON_CreateObject();
    cJSON_AddStringToObject(data, "productId", product_id);
    ctx_emit(ctx, "product.deleted", "product", product_id, data);
    return 0;
}
