/* handler_create_product.c - createProduct: a new product, in status DRAFT. */
#include "domain.h"

#include <stdio.h>
#include <stdlib.h>

int handle_create_product(struct cmd_ctx *ctx) {
    const cJSON *p = ctx->cmd->payload;
    struct verr v = {0};
    char *name = NULL, *description = NULL, *category = NULL, price[32], product_id[ID_LEN + 1];
    long long stock = 0;
    v_string(&v, p, "name", true, true, 1, 255, &name);
    v_string(&v, p, "description", false, false, 0, 10000, &description);
    v_price(&v, p, "price", true, price);
    v_int(&v, p, "stock", false, 0, 2147483647LL, &stock);
    v_string(&v, p, "category", false, true, 0, 100, &category);
    if (v_uuid(&v, p, "productId", false, product_id) == V_ABSENT) id_new(product_id);
    int rc;
    if (verr_any(&v) || ctx->validate_only) {
        rc = verr_any(&v) ? ctx_reject_invalid(ctx, &v) : 0;
        goto out;
    }
    char stock_s[24];
    snprintf(stock_s, sizeof stock_s, "%lld", stock);
    const char *params[6] = {product_id, name, description, price, stock_s, category};
    PGresult *r;
    rc = ctx_exec(ctx,
                  "INSERT INTO products (id, name, description, price, stock, category) "
                  "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING "
                  "RETURNING price::text, " SQL_RFC3339("created_at"),
                  6, params, &r);
    if (rc < 0) goto out;
    if (PQntuples(r) == 0) {
        PQclear(r);
        rc = ctx_reject(ctx, "CONFLICT", NULL, NULL, "a product with id %s already exists", product_id);
        goto out;
    }
    cJSON *data = cJSON_CreateObject();
    cJSON_AddStringToObject(data, "productId", product_id);
    cJSON_AddStringToObject(data, "name", name);
    json_add_optional(data, "description", description);
    cJSON_AddStringToObject(data, "price", PQgetvalue(r, 0, 0));
    cJSON_AddNumberToObject(data, "stock", (double)stock);
    json_add_optional(data, "category", category);
    cJSON_AddStringToObject(data, "status", "DRAFT");
    cJSON_AddStringToObject(data, "createdAt", PQgetvalue(r, 0, 1));
    PQclear(r);
    ctx_emit(ctx, "product.created", "product", product_id, data);
    rc = 0;
out:
    verr_free(&v);
    free(name);
    free(description);
    free(category);
    return rc;
}
