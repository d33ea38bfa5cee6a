/* handler_cancel_order.c - cancelOrder: a placed order, once; the stock goes
 * back to the products that still exist (locked in product-id order, as
 * placeOrder does, and before the order row, so that none deadlocks). */
#include "domain.h"

#include <string.h>

int handle_cancel_order(struct cmd_ctx *ctx) {
    struct verr v = {0};
    char order_id[ID_LEN + 1];
    v_uuid(&v, ctx->cmd->payload, "orderId", true, order_id);
    if (verr_any(&v)) return ctx_reject_invalid(ctx, &v);
    if (ctx->validate_only) return 0;
    const char *params[1] = {order_id};
    PGresult *r;
    /* products first, then the order: every transaction locks products in id
     * order before any order row (a batch takes all its products at once,
     * batch.c), so none waits for an order row while holding what another needs */
    int rc = ctx_exec(ctx, "SELECT p.id FROM products p JOIN order_items i ON i.product_id = p.id "
                           "WHERE i.order_id = $1 AND p.deleted_at IS NULL ORDER BY p.id FOR UPDATE OF p",
                      1, params, NULL);
    if (rc < 0) return rc;
    if ((rc = ctx_exec(ctx, "SELECT status FROM orders WHERE id = $1 FOR UPDATE", 1, params, &r)) < 0)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        return ctx_reject(ctx, "NOT_FOUND", NULL, NULL, "order %s does not exist", order_id);
    }
    bool placed = strcmp(PQgetvalue(r, 0, 0), "PLACED") == 0;
    PQclear(r);
    if (!placed) return ctx_reject(ctx, "CONFLICT", NULL, NULL, "order %s is already cancelled", order_id);
    if ((rc = ctx_exec(ctx, "UPDATE products p SET stock = p.stock + i.quantity, updated_at = now() "
                            "FROM order_items i WHERE i.order_id = $1 AND p.id = i.product_id "
                            "AND p.deleted_at IS NULL", 1, params, NULL)) < 0)
        return rc;
    if ((rc = ctx_exec(ctx, "UPDATE orders SET status = 'CANCELLED', cancelled_at = now() WHERE id = $1", 1,
                       params, NULL)) < 0)
        return rc;
    cJSON *data = cJSON_CreateObject();
    cJSON_AddStringToObject(data, "orderId", order_id);
    ctx_emit(ctx, "order.cancelled", "order", order_id, data);
    return 0;
}
