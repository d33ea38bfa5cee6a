/* handler_place_order.c - placeOrder: 1-100 items, the stock of every item
 * taken all-or-nothing. Product rows are locked in product-id order, so
 * concurrent orders never deadlock; each item keeps its unit price. */
#include "domain.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ITEMS 100
#define MAX_QUANTITY 1000000000LL

struct item {
    char product_id[ID_LEN + 1];
    long long quantity;
    long long stock;     /* from the locked row */
    char price[32];
    char status[16];
    bool found;
};

/* Appends s to the array literal being built in buf ("{a,b,...}"). */
static void array_add(char *buf, size_t n, const char *s) {
    size_t len = strlen(buf);
    snprintf(buf + len, n - len, "%s%s", len > 1 ? "," : "", s);
}

/* Checks payload.items into it (room for MAX_ITEMS), adding each problem to
 * v. Returns how many items it holds (0 when the field itself is wrong). */
static int check_items(struct verr *v, const cJSON *items, struct item *it) {
    int n = 0;
    if (!items || cJSON_IsNull(items)) verr_add(v, "items", "is required");
    else if (!cJSON_IsArray(items)) verr_add(v, "items", "must be an array");
    else if ((n = cJSON_GetArraySize(items)) < 1 || n > MAX_ITEMS) {
        verr_add(v, "items", "must hold 1-100 items");
        n = 0;
    } else {
        for (int i = 0; i < n; i++) {
            char prefix[32];
            snprintf(prefix, sizeof prefix, "items[%d].", i);
            v->prefix = prefix;
            const cJSON *e = cJSON_GetArrayItem(items, i);
            memset(&it[i], 0, sizeof it[i]);
            if (!cJSON_IsObject(e)) {
                v->prefix = NULL;
                snprintf(prefix, sizeof prefix, "items[%d]", i);
                verr_add(v, prefix, "must be an object {productId, quantity}");
                continue;
            }
            if (v_uuid(v, e, "productId", true, it[i].product_id) == V_VALID)
                for (int j = 0; j < i; j++)
                    if (strcmp(it[j].product_id, it[i].product_id) == 0) verr_add(v, "productId", "appears twice");
            v_int(v, e, "quantity", true, 1, MAX_QUANTITY, &it[i].quantity);
            v->prefix = NULL;
        }
    }
    return n;
}

/* Rejects the order for its first problem, by kind: a missing product, one
 * not for sale, one short. Returns true when it rejected (*rc: ctx_reject's
 * result), false when every item can be taken. */
static bool reject_first_problem(struct cmd_ctx *ctx, const struct item *it, int n, int *rc) {
    for (int i = 0; i < n; i++)
        if (!it[i].found) {
            cJSON *d = cJSON_CreateObject();
            cJSON_AddStringToObject(d, "productId", it[i].product_id);
            *rc = ctx_reject(ctx, "NOT_FOUND", NULL, d, "product %s does not exist", it[i].product_id);
            return true;
        }
    for (int i = 0; i < n; i++)
        if (strcmp(it[i].status, "ACTIVE") != 0) {
            cJSON *d = cJSON_CreateObject();
            cJSON_AddStringToObject(d, "productId", it[i].product_id);
            cJSON_AddStringToObject(d, "status", it[i].status);
            *rc = ctx_reject(ctx, "PRODUCT_UNAVAILABLE", NULL, d, "product %s is %s, not ACTIVE", it[i].product_id,
                             it[i].status);
            return true;
        }
    for (int i = 0; i < n; i++)
        if (it[i].stock < it[i].quantity) {
            cJSON *d = cJSON_CreateObject();
            cJSON_AddStringToObject(d, "productId", it[i].product_id);
            cJSON_AddNumberToObject(d, "available", (double)it[i].stock);
            cJSON_AddNumberToObject(d, "requested", (double)it[i].quantity);
            *rc = ctx_reject(ctx, "INSUFFICIENT_STOCK", NULL, d, "only %lld of product %s in stock, %lld requested",
                             it[i].stock, it[i].product_id, it[i].quantity);
            return true;
        }
    return false;
}

/* Emits order.placed (its items with their unit prices, the total) and the
 * stock notifications of every item. */
static void emit_placed(struct cmd_ctx *ctx, const char *order_id, const char *user_id, const struct item *it, int n,
                        const char *total) {
    cJSON *data = cJSON_CreateObject(), *arr = cJSON_CreateArray();
    cJSON_AddStringToObject(data, "orderId", order_id);
    cJSON_AddStringToObject(data, "userId", user_id);
    for (int i = 0; i < n; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "productId", it[i].product_id);
        cJSON_AddNumberToObject(o, "quantity", (double)it[i].quantity);
        cJSON_AddStringToObject(o, "unitPrice", it[i].price);
        cJSON_AddItemToArray(arr, o);
    }
    cJSON_AddItemToObject(data, "items", arr);
    cJSON_AddStringToObject(data, "total", total);
    ctx_emit(ctx, "order.placed", "order", order_id, data);
    for (int i = 0; i < n; i++)
        emit_stock_notifications(ctx, it[i].product_id, it[i].stock, it[i].stock - it[i].quantity);
}

int handle_place_order(struct cmd_ctx *ctx) {
    const cJSON *p = ctx->cmd->payload;
    struct verr v = {0};
    char user_id[ID_LEN + 1];
    v_uuid(&v, p, "userId", true, user_id);
    struct item it[MAX_ITEMS];
    int n = check_items(&v, cJSON_GetObjectItemCaseSensitive(p, "items"), it);
    if (verr_any(&v)) return ctx_reject_invalid(ctx, &v);
    if (ctx->validate_only) return 0;

    PGresult *r;
    const char *up[1] = {user_id};
    int rc = ctx_exec(ctx, "SELECT 1 FROM users WHERE id = $1", 1, up, &r);
    if (rc < 0) return rc;
    int users = PQntuples(r);
    PQclear(r);
    if (!users) return ctx_reject(ctx, "NOT_FOUND", NULL, NULL, "user %s does not exist", user_id);

    /* lock every product row, in id order */
    size_t cap = (size_t)n * (ID_LEN + 1) + 3;
    char *ids = calloc(1, cap), *qtys = calloc(1, (size_t)n * 12 + 3);
    if (!ids || !qtys) {
        rc = CV_ERETRY; /* out of memory: the command is tried again later */
        goto out;
    }
    strcpy(ids, "{");
    strcpy(qtys, "{");
    for (int i = 0; i < n; i++) {
        char q[24];
        snprintf(q, sizeof q, "%lld", it[i].quantity);
        array_add(ids, cap, it[i].product_id);
        array_add(qtys, (size_t)n * 12 + 3, q);
    }
    strcat(ids, "}");
    strcat(qtys, "}");
    const char *lp[1] = {ids};
    rc = ctx_exec(ctx, "SELECT id::text, stock, price::text, status FROM products "
                       "WHERE id = ANY($1::uuid[]) AND deleted_at IS NULL ORDER BY id FOR UPDATE", 1, lp, &r);
    if (rc < 0) goto out;
    for (int row = 0; row < PQntuples(r); row++)
        for (int i = 0; i < n; i++)
            if (strcmp(it[i].product_id, PQgetvalue(r, row, 0)) == 0) {
                it[i].found = true;
                it[i].stock = atoll(PQgetvalue(r, row, 1));
                snprintf(it[i].price, sizeof it[i].price, "%s", PQgetvalue(r, row, 2));
                snprintf(it[i].status, sizeof it[i].status, "%s", PQgetvalue(r, row, 3));
            }
    PQclear(r);
    if (reject_first_problem(ctx, it, n, &rc)) goto out;

    char order_id[ID_LEN + 1];
    id_new(order_id);
    const char *op[4] = {order_id, user_id, ids, qtys};
    if ((rc = ctx_exec(ctx, "UPDATE products p SET stock = p.stock - x.q, updated_at = now() "
                            "FROM unnest($1::uuid[], $2::int[]) AS x(id, q) WHERE p.id = x.id",
                       2, op + 2, NULL)) < 0)
        goto out;
    if ((rc = ctx_exec(ctx, "INSERT INTO orders (id, user_id, status, total) "
                            "SELECT $1, $2, 'PLACED', coalesce(sum(p.price * x.q), 0) "
                            "FROM unnest($3::uuid[], $4::int[]) AS x(id, q) JOIN products p ON p.id = x.id "
                            "RETURNING total::text", 4, op, &r)) < 0)
        goto out;
    char total[48];
    snprintf(total, sizeof total, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    if ((rc = ctx_exec(ctx, "INSERT INTO order_items (order_id, position, product_id, quantity, unit_price) "
                            "SELECT $1, x.n - 1, x.id, x.q, p.price "
                            "FROM unnest($2::uuid[], $3::int[]) WITH ORDINALITY AS x(id, q, n) "
                            "JOIN products p ON p.id = x.id", 3, (const char *[]){order_id, ids, qtys}, NULL)) < 0)
        goto out;

    emit_placed(ctx, order_id, user_id, it, n, total);
    rc = 0;
out:
    free(ids);
    free(qtys);
    return rc;
}
