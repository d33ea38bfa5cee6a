/* handler_update_stock.c - updateStock: change a product's stock, never below zero.
 * One conditional UPDATE does the usual case (its row lock serialises
 * concurrent changes); when it refuses, a locked read says why. */
#include "domain.h"

#include <stdio.h>
#include <stdlib.h>

#define STOCK_MAX 2147483647LL

int handle_update_stock(struct cmd_ctx *ctx) {
    const cJSON *p = ctx->cmd->payload;
    struct verr v = {0};
    char product_id[ID_LEN + 1];
    long long q = 0;
    v_uuid(&v, p, "productId", true, product_id);
    if (v_int(&v, p, "quantityChange", true, -1000000000LL, 1000000000LL, &q) == V_VALID && q == 0)
        verr_add(&v, "quantityChange", "must not be 0");
    if (verr_any(&v)) return ctx_reject_invalid(ctx, &v);
    if (ctx->validate_only) return 0;

    char q_s[24], next_s[24];
    snprintf(q_s, sizeof q_s, "%lld", q);
    const char *params[2] = {product_id, q_s};
    PGresult *r;
    long long prev, next;
    /* the usual case in one statement; only a change it refuses takes the locked read below */
    int rc = ctx_exec(ctx, "UPDATE products SET stock = stock + $2::bigint, updated_at = now() "
                           "WHERE id = $1 AND deleted_at IS NULL AND stock + $2::bigint BETWEEN 0 AND 2147483647 "
                           "RETURNING stock", 2, params, &r);
    if (rc < 0) return rc;
    if (PQntuples(r) == 1) {
        next = atoll(PQgetvalue(r, 0, 0));
        prev = next - q;
        PQclear(r);
    } else {
        PQclear(r);
        rc = ctx_exec(ctx, "SELECT stock FROM products WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", 1,
                      params, &r);
        if (rc < 0) return rc;
        if (PQntuples(r) == 0) {
            PQclear(r);
            return ctx_reject(ctx, "NOT_FOUND", NULL, NULL, "product %s does not exist", product_id);
        }
        prev = atoll(PQgetvalue(r, 0, 0));
        next = prev + q;
        PQclear(r);
        if (next < 0) {
            cJSON *details = cJSON_CreateObject();
            cJSON_AddNumberToObject(details, "available", (double)prev);
            cJSON_AddNumberToObject(details, "requested", (double)-q);
            return ctx_reject(ctx, "INSUFFICIENT_STOCK", NULL, details,
                              "only %lld in stock, %lld requested", prev, -q);
        }
        if (next > STOCK_MAX) {
            cJSON *fields = cJSON_CreateObject();
            cJSON_AddStringToObject(fields, "quantityChange", "would take the stock above 2147483647");
            return ctx_reject(ctx, "VALIDATION_FAILED", fields, NULL, "the stock would exceed its maximum");
        }
        /* it changed between the two statements and now fits */
        snprintf(next_s, sizeof next_s, "%lld", next);
        params[1] = next_s;
        rc = ctx_exec(ctx, "UPDATE products SET stock = $2, updated_at = now() WHERE id = $1", 2, params, NULL);
        if (rc < 0) return rc;
    }

    cJSON *data = cJSON_CreateObject();
    cJSON_AddStringToObject(data, "productId", product_id);
    cJSON_AddNumberToObject(data, "previousStock", (double)prev);
    cJSON_AddNumberToObject(data, "stock", (double)next);
    cJSON_AddNumberToObject(data, "quantityChange", (double)q);
    ctx_emit(ctx, "stock.updated", "product", product_id, data);
    emit_stock_notifications(ctx, product_id, prev, next);
    return 0;
}
