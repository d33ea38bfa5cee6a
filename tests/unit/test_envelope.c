/* test_envelope.c - the command envelope, the event envelope, ids, times, UTF-8, topics. */
#include "core.h"
#include "test.h"

#define ID "5f0c6a8e-8a9b-4f0e-9d3c-1f2e3d4c5b6a"
#define MAX 65536

static char err[512];

static int parse(const char *s, struct envelope *e) {
    err[0] = '\0';
    return envelope_parse(s, strlen(s), MAX, NULL, e, err, sizeof err);
}

/* Expects s to be dead-lettered with a reason containing want. */
static void dead(const char *s, const char *want) {
    struct envelope e;
    int rc = parse(s, &e);
    CHECK(rc == CV_EDEAD);
    if (!strstr(err, want)) {
        fprintf(stderr, "  reason \"%s\" lacks \"%s\" for %.80s\n", err, want, s);
        test_failures++;
    }
    envelope_free(&e);
}

TEST(valid_envelope_parses) {
    struct envelope e;
    CHECK(parse("{\"id\":\"" ID "\",\"type\":\"updateStock\",\"payload\":{\"productId\":\"x\"},"
                "\"correlationId\":\"order-7781\",\"createdAt\":\"2026-11-20T10:00:00.123Z\",\"extra\":1}  \n", &e) == 0);
    CHECK_STR(e.id, ID);
    CHECK_STR(e.type, "updateStock");
    CHECK_STR(e.correlation_id, "order-7781");
    CHECK_STR(e.created_at, "2026-11-20T10:00:00.123Z");
    CHECK(cJSON_IsObject(e.payload));
    CHECK(e.field_errors == NULL && !e.has_nul);
    envelope_free(&e);
}

TEST(id_is_lower_cased) {
    struct envelope e;
    CHECK(parse("{\"id\":\"5F0C6A8E-8A9B-4F0E-9D3C-1F2E3D4C5B6A\",\"type\":\"t\",\"payload\":{}}", &e) == 0);
    CHECK_STR(e.id, ID);
    envelope_free(&e);
}

TEST(missing_id_uses_message_id) {
    struct envelope e;
    const char *s = "{\"type\":\"t\",\"payload\":{}}";
    CHECK(envelope_parse(s, strlen(s), MAX, ID, &e, err, sizeof err) == 0);
    CHECK_STR(e.id, ID);
    envelope_free(&e);
    CHECK(envelope_parse(s, strlen(s), MAX, "not-a-uuid", &e, err, sizeof err) == CV_EDEAD);
    dead(s, "'id' is missing");
}

TEST(unusable_id_or_type_is_dead) {
    dead("{\"id\":\"abc\",\"type\":\"t\",\"payload\":{}}", "'id' must be a UUID");
    dead("{\"id\":42,\"type\":\"t\",\"payload\":{}}", "'id' must be a UUID");
    dead("{\"id\":\"" ID "x\",\"type\":\"t\",\"payload\":{}}", "'id' must be a UUID");
    dead("{\"id\":\"" ID "\",\"payload\":{}}", "'type' is missing");
    dead("{\"id\":\"" ID "\",\"type\":\"\",\"payload\":{}}", "'type' is missing");
    dead("{\"id\":\"" ID "\",\"type\":7,\"payload\":{}}", "'type' is missing");
}

TEST(payload_must_be_an_object) {
    dead("{\"id\":\"" ID "\",\"type\":\"t\"}", "'payload' is missing");
    dead("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":[]}", "'payload' is missing or not an object");
    dead("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":\"x\"}", "not an object");
    dead("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":null}", "not an object");
}

TEST(not_exactly_one_json_object_is_dead) {
    dead("", "not valid JSON");
    dead("not json", "not valid JSON");
    dead("{\"id\":", "not valid JSON");
    dead("[1,2]", "not a JSON object");
    dead("\"str\"", "not a JSON object");
    dead("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{}} {}", "bytes after");
    dead("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{\"a\":01}}", "leading zero");
    dead("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{\"a\":1.}}", "invalid number");
    dead("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{\"a\":\"x\ty\"}}", "control character");
    dead("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{\"a\":\"\\ud800\"}}", "surrogate");
    dead("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{}}x", "bytes after");
}

TEST(deep_nesting_is_dead) {
    size_t depth = 10000;
    char *s = xmalloc(depth * 2 + 128);
    strcpy(s, "{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":");
    size_t n = strlen(s);
    for (size_t i = 0; i < depth; i++) s[n++] = '[';
    for (size_t i = 0; i < depth; i++) s[n++] = ']';
    strcpy(s + n, "}");
    dead(s, "not valid JSON");
    free(s);
}

TEST(size_limit_both_sides) {
    struct envelope e;
    char *s = xmalloc(MAX + 2);
    const char *head = "{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{\"a\":\"";
    size_t n = strlen(head);
    memcpy(s, head, n);
    size_t fill = MAX - n - 3; /* exactly MAX bytes with the closing "}} */
    memset(s + n, 'x', fill);
    strcpy(s + n + fill, "\"}}");
    CHECK(strlen(s) == MAX);
    CHECK(envelope_parse(s, MAX, MAX, NULL, &e, err, sizeof err) == 0);
    envelope_free(&e);
    CHECK(envelope_parse(s, MAX, MAX - 1, NULL, &e, err, sizeof err) == CV_EDEAD);
    CHECK(strstr(err, "over the limit") != NULL);
    free(s);
}

TEST(invalid_utf8_is_dead) {
    dead("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{\"n\":\"\xff\"}}", "not valid UTF-8");
    dead("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{\"n\":\"\xc0\xaf\"}}", "not valid UTF-8");
    struct envelope e;
    const char raw[] = "{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{}}\0";
    CHECK(envelope_parse(raw, sizeof raw - 1, MAX, NULL, &e, err, sizeof err) == CV_EDEAD);
    CHECK(strstr(err, "NUL byte") != NULL);
}

TEST(escaped_nul_is_flagged_not_dead) {
    struct envelope e;
    CHECK(parse("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{\"n\":\"a\\u0000b\"}}", &e) == 0);
    CHECK(e.has_nul);
    envelope_free(&e);
    CHECK(parse("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{\"n\":\"a\\\\u0000b\"}}", &e) == 0);
    CHECK(!e.has_nul); /* an escaped backslash followed by the text u0000 */
    envelope_free(&e);
}

TEST(escaped_nul_in_id_or_type_is_dead) {
    /* cut at the NUL, each would name another command or another type */
    dead("{\"id\":\"" ID "\\u0000junk\",\"type\":\"t\",\"payload\":{}}", "NUL character");
    dead("{\"id\":\"" ID "\\u0000\",\"type\":\"t\",\"payload\":{}}", "NUL character");
    dead("{\"id\":\"" ID "\",\"type\":\"createProduct\\u0000x\",\"payload\":{}}", "NUL character");
    dead("{\"id\\u0000x\":\"7e9cf0a8-3b1d-4c5e-8f2a-9d0b1c2e3f40\",\"id\":\"" ID
         "\",\"type\":\"t\",\"payload\":{}}", "NUL character");
    /* one elsewhere leaves id and type usable: the command is rejected under its own id */
    struct envelope e;
    CHECK(parse("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{\"n\":\"\\u0000\"}}", &e) == 0);
    CHECK(e.has_nul);
    CHECK_STR(e.id, ID);
    CHECK_STR(e.type, "t");
    envelope_free(&e);
}

TEST(correlation_id_limits) {
    struct envelope e;
    char s[1024], corr[300];
    memset(corr, 'c', 200);
    corr[200] = '\0';
    snprintf(s, sizeof s, "{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{},\"correlationId\":\"%s\"}", corr);
    CHECK(parse(s, &e) == 0 && e.field_errors == NULL && e.correlation_id && strlen(e.correlation_id) == 200);
    envelope_free(&e);
    corr[200] = 'c';
    corr[201] = '\0';
    snprintf(s, sizeof s, "{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{},\"correlationId\":\"%s\"}", corr);
    CHECK(parse(s, &e) == 0 && e.field_errors && cJSON_GetObjectItem(e.field_errors, "correlationId"));
    envelope_free(&e);
    CHECK(parse("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{},\"correlationId\":5}", &e) == 0);
    CHECK(e.field_errors && cJSON_GetObjectItem(e.field_errors, "correlationId"));
    envelope_free(&e);
}

TEST(created_at_must_be_rfc3339) {
    struct envelope e;
    CHECK(parse("{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{},\"createdAt\":\"yesterday\"}", &e) == 0);
    CHECK(e.field_errors && cJSON_GetObjectItem(e.field_errors, "createdAt"));
    envelope_free(&e);
    CHECK(clock_rfc3339_valid("2026-11-20T10:00:00Z"));
    CHECK(clock_rfc3339_valid("2026-11-20T10:00:00.123456+01:00"));
    CHECK(!clock_rfc3339_valid("2026-11-20 10:00:00Z"));
    CHECK(!clock_rfc3339_valid("2026-13-20T10:00:00Z"));
    CHECK(!clock_rfc3339_valid("2026-11-20T10:00:00"));
    CHECK(!clock_rfc3339_valid("2026-02-31T10:00:00Z")); /* no such day */
    CHECK(!clock_rfc3339_valid("2026-04-31T10:00:00Z"));
    CHECK(!clock_rfc3339_valid("2026-02-29T10:00:00Z")); /* not a leap year */
    CHECK(clock_rfc3339_valid("2028-02-29T10:00:00Z"));
    CHECK(clock_rfc3339_valid("2000-02-29T10:00:00Z"));
    CHECK(!clock_rfc3339_valid("1900-02-29T10:00:00Z"));
    CHECK(!clock_rfc3339_valid("2026-11-20T10:00:00+24:00")); /* no such offset */
    CHECK(!clock_rfc3339_valid("2026-11-20T10:00:00+99:99"));
    CHECK(clock_rfc3339_valid("2026-11-20T10:00:00-23:59"));
}

TEST(build_round_trips) {
    cJSON *p = cJSON_Parse("{\"productId\":\"x\",\"quantityChange\":-3}");
    char *s = envelope_build(NULL, "updateStock", p, "corr", NULL, NULL);
    struct envelope e;
    CHECK(parse(s, &e) == 0);
    CHECK_STR(e.type, "updateStock");
    CHECK_STR(e.correlation_id, "corr");
    CHECK(e.created_at && clock_rfc3339_valid(e.created_at));
    CHECK(cJSON_GetObjectItem(e.payload, "quantityChange")->valuedouble == -3);
    free(s);
    cJSON_Delete(p);
    envelope_free(&e);
}

TEST(event_envelope_fields) {
    struct envelope cmd;
    CHECK(parse("{\"id\":\"" ID "\",\"type\":\"updateStock\",\"payload\":{}}", &cmd) == 0);
    cJSON *ev = event_new("stock.updated", &cmd, "product", "agg", cJSON_CreateObject());
    CHECK(id_parse(cJSON_GetObjectItem(ev, "id")->valuestring, NULL));
    CHECK_STR(cJSON_GetObjectItem(ev, "type")->valuestring, "stock.updated");
    CHECK(clock_rfc3339_valid(cJSON_GetObjectItem(ev, "occurredAt")->valuestring));
    CHECK_STR(cJSON_GetObjectItem(ev, "commandId")->valuestring, ID);
    CHECK_STR(cJSON_GetObjectItem(ev, "commandType")->valuestring, "updateStock");
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(ev, "correlationId")));
    CHECK_STR(cJSON_GetObjectItem(ev, "aggregateType")->valuestring, "product");
    CHECK_STR(cJSON_GetObjectItem(ev, "aggregateId")->valuestring, "agg");
    CHECK(cJSON_IsObject(cJSON_GetObjectItem(ev, "data")));
    cJSON_Delete(ev);
    envelope_free(&cmd);
}

TEST(ids_and_times) {
    char a[ID_LEN + 1], b[ID_LEN + 1], ts[32];
    id_new(a);
    id_new(b);
    CHECK(id_parse(a, NULL) && strcmp(a, b) != 0);
    CHECK(!id_parse("5f0c6a8e8a9b4f0e9d3c1f2e3d4c5b6a", NULL));
    clock_rfc3339(1763632800123LL, ts);
    CHECK_STR(ts, "2025-11-20T10:00:00.123Z");
}

TEST(utf8_rules) {
    CHECK(utf8_valid("plain", 5));
    CHECK(utf8_valid("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9));
    CHECK(!utf8_valid("\xed\xa0\x80", 3));      /* surrogate */
    CHECK(!utf8_valid("\xe0\x80\xaf", 3));      /* overlong */
    CHECK(!utf8_valid("\xf4\x90\x80\x80", 4));  /* above U+10FFFF */
    CHECK(!utf8_valid("\xc3", 1));              /* truncated */
    CHECK(utf8_chars("\xc3\xa9t\xc3\xa9") == 3);
    char cut[] = "caf\xc3\xa9 \xe2\x82", other[] = "\xff\xc3\xa9\x80";
    utf8_cut(cut);                              /* a character cut by a truncation */
    CHECK_STR(cut, "caf\xc3\xa9 ??");
    utf8_cut(other);                            /* bytes of no character */
    CHECK_STR(other, "?\xc3\xa9?");
}

TEST(topic_patterns) {
    CHECK(topic_match("stock.*", "stock.updated"));
    CHECK(!topic_match("stock.*", "product.created"));
    CHECK(!topic_match("stock.*", "stock"));
    CHECK(topic_match("#", "user.passwordChanged"));
    CHECK(topic_match("user.#", "user.registered"));
    CHECK(topic_match("user.#", "user"));
    CHECK(topic_match("*.rejected", "command.rejected"));
    CHECK(topic_match("#.depleted", "stock.depleted"));
    CHECK(!topic_match("stock.low", "stock.lower"));
    CHECK(topic_match("stock.low", "stock.low"));
}

#define TRACE "0af7651916cd43dd8448eb211c80319c"
#define SPAN "b7ad6b7169203331"
#define TP "00-" TRACE "-" SPAN "-01"

/* Expects trace_parse to refuse s, with a reason. */
static void trace_invalid(const char *s) {
    struct trace t;
    const char *why = NULL;
    memset(&t, 'x', sizeof t);
    if (trace_parse(s, &t, &why) || !why || t.trace_id[0]) {
        fprintf(stderr, "  traceparent \"%s\" was accepted\n", s ? s : "(null)");
        test_failures++;
    }
}

TEST(traceparent_parses) {
    struct trace t;
    const char *why = "unset";
    CHECK(trace_parse(TP, &t, &why));
    CHECK(why == NULL);
    CHECK_STR(t.trace_id, TRACE);
    CHECK_STR(t.parent_id, SPAN);
    CHECK_STR(t.flags, "01");
    CHECK(trace_parse("00-" TRACE "-" SPAN "-00", &t, NULL));
    CHECK_STR(t.flags, "00");
    /* a later version is read as 00: its first 55 characters, then '-' and more */
    CHECK(trace_parse("01-" TRACE "-" SPAN "-01", &t, NULL));
    CHECK(trace_parse("cc-" TRACE "-" SPAN "-01-what-the-future-holds", &t, NULL));
    CHECK_STR(t.trace_id, TRACE);
    CHECK_STR(t.flags, "01");
}

TEST(traceparent_invalid_is_refused) {
    trace_invalid(NULL);
    trace_invalid("");
    trace_invalid("00-" TRACE "-" SPAN);                              /* no flags */
    trace_invalid("00-" TRACE "-" SPAN "-01-");                       /* version 00 is exactly 55 */
    trace_invalid("00-" TRACE "-" SPAN "-010");
    trace_invalid("cc-" TRACE "-" SPAN "-01x");                       /* more, not after '-' */
    trace_invalid("ff-" TRACE "-" SPAN "-01");                        /* version ff */
    trace_invalid("0g-" TRACE "-" SPAN "-01");
    trace_invalid("00-0AF7651916CD43DD8448EB211C80319C-" SPAN "-01"); /* upper case */
    trace_invalid("00-" TRACE "-B7AD6B7169203331-01");
    trace_invalid("00-" TRACE "-" SPAN "-0A");
    trace_invalid("00-00000000000000000000000000000000-" SPAN "-01"); /* all zero */
    trace_invalid("00-" TRACE "-0000000000000000-01");
    trace_invalid("00_" TRACE "-" SPAN "-01");                        /* separators */
    trace_invalid("00-" TRACE "_" SPAN "-01");
    trace_invalid("00-" TRACE "-" SPAN "_01");
    trace_invalid("00-0af7651916cd43dd8448eb211c80319-" SPAN "x-01"); /* fields shifted */
}

TEST(traceparent_child_is_a_new_span_of_the_trace) {
    struct trace t, c1, c2;
    char a[TRACEPARENT_LEN + 1], b[TRACEPARENT_LEN + 1];
    CHECK(trace_parse("00-" TRACE "-" SPAN "-03", &t, NULL));
    CHECK(trace_child(&t, a) && trace_child(&t, b));
    CHECK(strlen(a) == TRACEPARENT_LEN && strncmp(a, "00-" TRACE "-", 36) == 0);
    CHECK(trace_parse(a, &c1, NULL) && trace_parse(b, &c2, NULL));
    CHECK_STR(c1.trace_id, TRACE);
    CHECK_STR(c1.flags, "03");
    CHECK(strcmp(c1.parent_id, SPAN) != 0 && strcmp(c1.parent_id, c2.parent_id) != 0);
    /* a later version's child is version 00 */
    CHECK(trace_parse("7f-" TRACE "-" SPAN "-01-x", &t, NULL) && trace_child(&t, a));
    CHECK(strncmp(a, "00-", 3) == 0 && strlen(a) == TRACEPARENT_LEN);
    memset(&t, 0, sizeof t);
    CHECK(!trace_child(&t, a) && a[0] == '\0');
    CHECK(!trace_child(NULL, a));
}

TEST(envelope_traceparent) {
    struct envelope e;
    /* the field gives the trace context, and each event a new span of it */
    CHECK(parse("{\"id\":\"" ID "\",\"type\":\"updateStock\",\"payload\":{},\"traceparent\":\"" TP "\"}", &e) == 0);
    CHECK_STR(e.trace.trace_id, TRACE);
    CHECK(e.field_errors == NULL);
    envelope_trace_header(&e, "00-11111111111111111111111111111111-" SPAN "-01"); /* the field wins over a header */
    CHECK_STR(e.trace.trace_id, TRACE);
    cJSON *ev = event_new("stock.updated", &e, "product", "agg", NULL);
    const cJSON *tp = cJSON_GetObjectItem(ev, "traceparent");
    struct trace t;
    CHECK(cJSON_IsString(tp) && trace_parse(tp->valuestring, &t, NULL));
    CHECK_STR(t.trace_id, TRACE);
    CHECK_STR(t.flags, "01");
    CHECK(strcmp(t.parent_id, SPAN) != 0);
    cJSON_Delete(ev);
    envelope_free(&e);
    /* invalid or not a string: ignored, never an error; a header may then give it */
    const char *ignored[] = {"\"00-" TRACE "-" SPAN "-1\"", "\"FF-" TRACE "-" SPAN "-01\"", "42", "null", "{}"};
    for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; i++) {
        char s[256];
        snprintf(s, sizeof s, "{\"id\":\"" ID "\",\"type\":\"t\",\"payload\":{},\"traceparent\":%s}", ignored[i]);
        CHECK(parse(s, &e) == 0);
        CHECK(e.trace.trace_id[0] == '\0' && e.field_errors == NULL);
        CHECK((e.trace_ignored != NULL) == (strcmp(ignored[i], "null") != 0));
        ev = event_new("x.y", &e, "a", "b", NULL);
        CHECK(cJSON_GetObjectItem(ev, "traceparent") == NULL);
        cJSON_Delete(ev);
        envelope_trace_header(&e, "bad");
        CHECK(e.trace.trace_id[0] == '\0' && e.trace_ignored == NULL);
        envelope_trace_header(&e, TP);
        CHECK_STR(e.trace.trace_id, TRACE);
        envelope_free(&e);
    }
}

TEST_MAIN()
