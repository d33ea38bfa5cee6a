/* handler.c - the command table, and what handlers use to emit and reject. */
#include "workers.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static const struct {
    const char *type;
    handler_fn fn;
} handlers[] = {
    {"register", handle_register},
    {"createProduct", handle_create_product},
    {"updateStock", handle_update_stock},
};

handler_fn handler_find(const char *type) {
    for (size_t i = 0; i < sizeof handlers / sizeof handlers[0]; i++)
        if (strcmp(handlers[i].type, type) == 0) return handlers[i].fn;
    return NULL;
}

void ctx_emit(struct cmd_ctx *ctx, const char *type, const char *aggregate_type,
              const char *aggregate_id, cJSON *data) {
    if (!ctx->events) ctx->events = cJSON_CreateArray();
    cJSON_AddItemToArray(ctx->events, event_new(type, ctx->cmd, aggregate_type, aggregate_id, data));
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

int ctx_reject_invalid(struct cmd_ctx *ctx, struct verr *v) {
    cJSON *fields = v->fields;
    v->fields = NULL;
    return ctx_reject(ctx, "VALIDATION_FAILED", fields, NULL, "the payload breaks %d rule%s",
                      cJSON_GetArraySize(fields), cJSON_GetArraySize(fields) == 1 ? "" : "s");
}
