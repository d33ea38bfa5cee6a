/* fuzz_command.c - libFuzzer target: the envelope parser, the payload
 * validation of every command and the traceparent parser, on arbitrary bytes.
 * Nothing may crash, leak or read out of bounds; a parsed envelope must have a
 * UUID id and a payload object. */
#include "domain.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* the bytes as a traceparent (the RabbitMQ header): refused, or fields of their exact lengths */
    char *header = strndup((const char *)data, size);
    struct trace tp;
    if (header && trace_parse(header, &tp, NULL) &&
        (strlen(tp.trace_id) != TRACE_ID_LEN || strlen(tp.parent_id) != TRACE_SPAN_LEN || strlen(tp.flags) != 2))
        abort();
    if (header && !trace_parse(header, &tp, NULL) && tp.trace_id[0]) abort();
    free(header);
    struct envelope e;
    char err[256];
    if (envelope_parse((const char *)data, size, 65536, NULL, &e, err, sizeof err) != 0) return 0;
    if (!id_parse(e.id, NULL) || !cJSON_IsObject(e.payload) || !e.type[0]) abort();
    /* a trace context, when there is one, is valid: a child span of it parses, in the same trace */
    envelope_trace_header(&e, NULL);
    if (e.trace.trace_id[0]) {
        char child[TRACEPARENT_LEN + 1];
        struct trace t;
        if (!trace_child(&e.trace, child) || !trace_parse(child, &t, NULL) || strcmp(t.trace_id, e.trace.trace_id))
            abort();
    }
    const struct handler *h = handler_find(e.type);
    if (h) {
        struct cfg cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.stock_low_threshold = 10;
        struct cmd_ctx ctx = {.db = NULL, .cfg = &cfg, .cmd = &e, .validate_only = true};
        int rc = h->run(&ctx);
        if (rc != 0 && rc != CV_EREJECT) abort();
        if (rc == CV_EREJECT && (!ctx.rej.code || !ctx.rej.fields)) abort();
        cJSON_Delete(ctx.rej.fields);
        cJSON_Delete(ctx.rej.details);
        cJSON_Delete(ctx.events);
    }
    envelope_free(&e);
    return 0;
}
