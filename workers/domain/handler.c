/* handler.c - the command table, and what handlers use to emit and reject. */
#include "domain.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sodium.h>

static const struct handler handlers[] = {
    {.type = "register", .run = handle_register, .locks = LOCKS_USER, .order_field = "userId"}, /* hashes first */
    {.type = "changePassword", .run = handle_change_password, .locks = LOCKS_USER, .order_field = "userId"}, /* hashes first */
    {.type = "createProduct", .run = handle_create_product, .locks = LOCKS_PRODUCT, .order_field = "productId"}, /* makes an id when none is given */
    {.type = "updateProduct", .run = handle_update_product, .locks = LOCKS_PRODUCT, .order_field = "productId"}, /* a locked read, then the update */
    {.type = "updateStock", .run = handle_update_stock, .locks = LOCKS_PRODUCT, .runs_ahead = true, .order_field = "productId"},
    {.type = "deleteProduct", .run = handle_delete_product, .locks = LOCKS_PRODUCT, .runs_ahead = true, .order_field = "productId"},
    {.type = "placeOrder", .run = handle_place_order, .locks = LOCKS_ITEM_PRODUCTS, .order_field = "userId"},   /* several statements */
    {.type = "cancelOrder", .run = handle_cancel_order, .locks = LOCKS_ORDER_PRODUCTS, .order_field = "orderId"}, /* several statements */
};

const struct handler *handler_find(const char *type) {
    for (size_t i = 0; i < sizeof handlers / sizeof handlers[0]; i++)
        if (strcmp(handlers[i].type, type) == 0) return &handlers[i];
    return NULL;
}

/* The UUID in obj[field], lower-cased into out; false when there is none. */
static bool uuid_member(const cJSON *obj, const char *field, char out[ID_LEN + 1]) {
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(obj, field);
    return cJSON_IsString(m) && id_parse(m->valuestring, out);
}

void handler_lock_key(const struct handler *h, const cJSON *payload, char out[ID_LEN + 3]) {
    char id[ID_LEN + 1], least[ID_LEN + 1] = "";
    out[0] = '\0';
    switch (h->locks) {
    case LOCKS_PRODUCT:
        if (uuid_member(payload, "productId", id)) snprintf(out, ID_LEN + 3, "p:%s", id);
        break;
    case LOCKS_USER:
        if (uuid_member(payload, "userId", id)) snprintf(out, ID_LEN + 3, "u:%s", id);
        break;
    case LOCKS_ITEM_PRODUCTS: {
        const cJSON *items = cJSON_GetObjectItemCaseSensitive(payload, "items"), *it;
        cJSON_ArrayForEach(it, (cJSON_IsArray(items) ? items : NULL))
            if (uuid_member(it, "productId", id) && (!least[0] || strcmp(id, least) < 0)) memcpy(least, id, sizeof id);
        if (least[0]) snprintf(out, ID_LEN + 3, "p:%s", least);
        break;
    }
    case LOCKS_ORDER_PRODUCTS: /* its products are known from the database only: the batch locks them first */
    case LOCKS_NONE:
        break;
    }
}

void handler_lock_rows(const struct handler *h, const cJSON *payload, cJSON *products, cJSON *orders) {
    char id[ID_LEN + 1];
    if (h->locks == LOCKS_PRODUCT && uuid_member(payload, "productId", id))
        cJSON_AddItemToArray(products, cJSON_CreateString(id));
    if (h->locks == LOCKS_ORDER_PRODUCTS && uuid_member(payload, "orderId", id))
        cJSON_AddItemToArray(orders, cJSON_CreateString(id));
    if (h->locks == LOCKS_ITEM_PRODUCTS) {
        const cJSON *items = cJSON_GetObjectItemCaseSensitive(payload, "items"), *it;
        cJSON_ArrayForEach(it, (cJSON_IsArray(items) ? items : NULL))
            if (uuid_member(it, "productId", id)) cJSON_AddItemToArray(products, cJSON_CreateString(id));
    }
}

/* Stops the handler to run it again later: ctx->paused says so, not the class. */
static int ctx_pause(struct cmd_ctx *ctx) {
    ctx->paused = true;
    return CV_ERETRY;
}

int ctx_exec(struct cmd_ctx *ctx, const char *sql, int nparams, const char *const *params, PGresult **out) {
    int nth = ctx->statements++;
    if (ctx->ahead == AHEAD_OFF) return db_exec(ctx->db, sql, nparams, params, out);
    if (out) *out = NULL;
    if (nth > 0) return ctx_pause(ctx);
    if (ctx->ahead == AHEAD_SEND) {
        int h = db_defer_result(ctx->db, sql, nparams, params);
        if (h < 0) return h;
        *ctx->handle = h;
        return ctx_pause(ctx);
    }
    if (!*ctx->first) return ctx_pause(ctx); /* it failed: the command runs again to meet the error */
    if (out) *out = *ctx->first;
    else PQclear(*ctx->first);
    *ctx->first = NULL;
    return 0;
}

void ctx_emit(struct cmd_ctx *ctx, const char *type, const char *aggregate_type,
              const char *aggregate_id, cJSON *data) {
    if (!ctx->events) ctx->events = cJSON_CreateArray();
    cJSON_AddItemToArray(ctx->events, event_new(type, ctx->cmd, aggregate_type, aggregate_id, data));
}

void ctx_emit_rejection(struct cmd_ctx *ctx) {
    struct rejection *rej = &ctx->rej;
    cJSON *d = cJSON_CreateObject();
    cJSON_AddStringToObject(d, "code", rej->code);
    cJSON_AddStringToObject(d, "message", rej->message);
    if (rej->fields) cJSON_AddItemToObject(d, "fields", rej->fields);
    if (rej->details) cJSON_AddItemToObject(d, "details", rej->details);
    rej->fields = rej->details = NULL;
    ctx_emit(ctx, "command.rejected", "command", ctx->cmd->id, d);
}

int ctx_reject(struct cmd_ctx *ctx, const char *code, cJSON *fields, cJSON *details,
               const char *fmt, ...) {
    ctx->rej.code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->rej.message, sizeof ctx->rej.message, fmt, ap);
    va_end(ap);
    cJSON_Delete(ctx->rej.fields);
    cJSON_Delete(ctx->rej.details);
    ctx->rej.fields = fields;
    ctx->rej.details = details;
    return CV_EREJECT;
}

void emit_stock_notifications(struct cmd_ctx *ctx, const char *product_id, long long prev, long long next) {
    long long thr = ctx->cfg->stock_low_threshold;
    if (prev > thr && next <= thr) {
        cJSON *data = cJSON_CreateObject();
        cJSON_AddStringToObject(data, "productId", product_id);
        cJSON_AddNumberToObject(data, "stock", (double)next);
        cJSON_AddNumberToObject(data, "threshold", (double)thr);
        ctx_emit(ctx, "stock.low", "product", product_id, data);
    }
    if (next == 0 && prev > 0) {
        cJSON *data = cJSON_CreateObject();
        cJSON_AddStringToObject(data, "productId", product_id);
        ctx_emit(ctx, "stock.depleted", "product", product_id, data);
    }
}

int password_hash(const struct cmd_ctx *ctx, const char *password, char out[128]) {
    if (crypto_pwhash_str(out, password, strlen(password), (unsigned long long)ctx->cfg->password_opslimit,
                          (size_t)ctx->cfg->password_memlimit_mb * 1024 * 1024) != 0) {
        log_cmd(LOG_ERROR, ctx->cmd, "password hashing ran out of memory");
        return CV_ERETRY;
    }
    return 0;
}

int ctx_reject_invalid(struct cmd_ctx *ctx, struct verr *v) {
    cJSON *fields = v->fields;
    v->fields = NULL;
    return ctx_reject(ctx, "VALIDATION_FAILED", fields, NULL, "the payload breaks %d rule%s",
                      cJSON_GetArraySize(fields), cJSON_GetArraySize(fields) == 1 ? "" : "s");
}
