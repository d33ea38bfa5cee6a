/* test_validate.c - every payload rule of register, createProduct and updateStock,
 * on both sides of each boundary. Invalid payloads are rejected before any SQL,
 * so the handlers run here without a database. */
#include "domain.h"
#include "test.h"

/* A string of n copies of the UTF-8 character c. */
static char *rep(const char *c, size_t n) {
    size_t l = strlen(c);
    char *s = xmalloc(l * n + 1);
    for (size_t i = 0; i < n; i++) memcpy(s + i * l, c, l);
    s[l * n] = '\0';
    return s;
}

/* Runs a handler on payload; returns the rejection fields (caller frees). A
 * payload holding "__valid" must pass validation instead (NULL is returned). */
static cJSON *rejected_fields(handler_fn h, const char *type, cJSON *payload) {
    char *env = envelope_build(NULL, type, payload, NULL, NULL, NULL);
    struct envelope e;
    char err[256];
    CHECK(envelope_parse(env, strlen(env), 1 << 20, NULL, &e, err, sizeof err) == 0);
    free(env);
    struct cfg cfg = {.stock_low_threshold = 10};
    struct cmd_ctx ctx = {.db = NULL, .cfg = &cfg, .cmd = &e};
    cJSON *fields = NULL;
    if (cJSON_GetObjectItem(payload, "__valid")) {
        /* expected to pass validation: run it up to the database, no further */
        ctx.validate_only = true;
        CHECK(h(&ctx) == 0);
    } else {
        int rc = h(&ctx);
        CHECK(rc == CV_EREJECT);
        if (ctx.rej.code) CHECK_STR(ctx.rej.code, "VALIDATION_FAILED");
        fields = ctx.rej.fields;
        ctx.rej.fields = NULL;
    }
    cJSON_Delete(ctx.rej.details);
    cJSON_Delete(ctx.events);
    envelope_free(&e);
    cJSON_Delete(payload);
    return fields;
}

static void expect_fields(handler_fn h, const char *type, const char *payload_json, const char *const *want) {
    cJSON *p = cJSON_Parse(payload_json);
    CHECK(p != NULL);
    cJSON *f = rejected_fields(h, type, p);
    int n = 0;
    for (const char *const *w = want; *w; w++, n++) {
        if (!cJSON_GetObjectItemCaseSensitive(f, *w)) {
            fprintf(stderr, "  expected field '%s' rejected for %s\n", *w, payload_json);
            test_failures++;
        }
    }
    if (cJSON_GetArraySize(f) != n) {
        char *s = cJSON_PrintUnformatted(f);
        fprintf(stderr, "  expected %d fields, got %s for %.120s\n", n, s, payload_json);
        free(s);
        test_failures++;
    }
    cJSON_Delete(f);
}

/* One field checked alone: V_VALID, V_INVALID (an error recorded) or V_ABSENT. */
typedef enum v_result (*field_check)(struct verr *, const cJSON *);
static enum v_result check_one(field_check fn, const char *json) {
    cJSON *o = cJSON_Parse(json);
    CHECK(o != NULL);
    struct verr v = {0};
    enum v_result rc = fn(&v, o);
    CHECK((rc == V_INVALID) == verr_any(&v) || rc == V_ABSENT);
    verr_free(&v);
    cJSON_Delete(o);
    return rc;
}

static char *out_s;
static enum v_result name_255(struct verr *v, const cJSON *o) {
    enum v_result rc = v_string(v, o, "name", true, true, 1, 255, &out_s);
    free(out_s);
    return rc;
}

TEST(name_length_boundaries) {
    char buf[4096];
    char *s = rep("a", 255);
    snprintf(buf, sizeof buf, "{\"name\":\"%s\"}", s);
    CHECK(check_one(name_255, buf) == V_VALID);
    free(s);
    s = rep("a", 256);
    snprintf(buf, sizeof buf, "{\"name\":\"%s\"}", s);
    CHECK(check_one(name_255, buf) == V_INVALID);
    free(s);
    s = rep("\xc3\xa9", 255); /* 255 characters, 510 bytes */
    snprintf(buf, sizeof buf, "{\"name\":\"%s\"}", s);
    CHECK(check_one(name_255, buf) == V_VALID);
    free(s);
    s = rep("a", 255);
    snprintf(buf, sizeof buf, "{\"name\":\"   %s   \"}", s); /* too long only before trimming */
    CHECK(check_one(name_255, buf) == V_VALID);
    free(s);
    CHECK(check_one(name_255, "{\"name\":\"a\"}") == V_VALID);
    CHECK(check_one(name_255, "{\"name\":\"\"}") == V_INVALID);
    CHECK(check_one(name_255, "{\"name\":\"   \"}") == V_INVALID);
    CHECK(check_one(name_255, "{\"name\":5}") == V_INVALID);
    CHECK(check_one(name_255, "{}") == V_ABSENT);
    struct verr v = {0};
    cJSON *o = cJSON_Parse("{\"name\":\"  Ann  \"}");
    CHECK(v_string(&v, o, "name", true, true, 1, 255, &out_s) == V_VALID);
    CHECK_STR(out_s, "Ann");
    free(out_s);
    cJSON_Delete(o);
}

static enum v_result email(struct verr *v, const cJSON *o) {
    enum v_result rc = v_email(v, o, "email", true, &out_s);
    free(out_s);
    return rc;
}

TEST(email_rules) {
    char buf[1024];
    char *local = rep("a", 64), *dom = rep("b", 254 - 64 - 1 - 4);
    snprintf(buf, sizeof buf, "{\"email\":\"%s@%s.com\"}", local, dom); /* 254 characters */
    CHECK(check_one(email, buf) == V_VALID);
    snprintf(buf, sizeof buf, "{\"email\":\"%s@%sb.com\"}", local, dom); /* 255 */
    CHECK(check_one(email, buf) == V_INVALID);
    free(local);
    free(dom);
    CHECK(check_one(email, "{\"email\":\"a@b.co\"}") == V_VALID);
    CHECK(check_one(email, "{\"email\":\"ab.co\"}") == V_INVALID);
    CHECK(check_one(email, "{\"email\":\"a@b@c.co\"}") == V_INVALID);
    CHECK(check_one(email, "{\"email\":\"@b.co\"}") == V_INVALID);
    CHECK(check_one(email, "{\"email\":\"a@bco\"}") == V_INVALID);
    CHECK(check_one(email, "{\"email\":\"a@.co\"}") == V_INVALID);
    CHECK(check_one(email, "{\"email\":\"a@co.\"}") == V_INVALID);
    CHECK(check_one(email, "{\"email\":\"a b@c.co\"}") == V_INVALID);
    CHECK(check_one(email, "{\"email\":7}") == V_INVALID);
    struct verr v = {0};
    cJSON *o = cJSON_Parse("{\"email\":\" Ann@Example.COM \"}");
    CHECK(v_email(&v, o, "email", true, &out_s) == V_VALID);
    CHECK_STR(out_s, "Ann@Example.COM"); /* trimmed; lower-cased by the database as it is stored */
    free(out_s);
    cJSON_Delete(o);
}

static enum v_result password(struct verr *v, const cJSON *o) {
    const char *p;
    return v_password(v, o, "password", true, &p);
}

TEST(password_rules) {
    char buf[512];
    CHECK(check_one(password, "{\"password\":\"Abcdef1\"}") == V_INVALID);  /* 7 bytes */
    CHECK(check_one(password, "{\"password\":\"Abcdef12\"}") == V_VALID);  /* 8 */
    char *s = rep("a", 126);
    snprintf(buf, sizeof buf, "{\"password\":\"A1%s\"}", s); /* 128 */
    CHECK(check_one(password, buf) == V_VALID);
    snprintf(buf, sizeof buf, "{\"password\":\"A1a%s\"}", s); /* 129 */
    CHECK(check_one(password, buf) == V_INVALID);
    free(s);
    CHECK(check_one(password, "{\"password\":\"abcdefg1\"}") == V_INVALID); /* no upper */
    CHECK(check_one(password, "{\"password\":\"ABCDEFG1\"}") == V_INVALID); /* no lower */
    CHECK(check_one(password, "{\"password\":\"Abcdefgh\"}") == V_INVALID); /* no digit */
    CHECK(check_one(password, "{\"password\":12345678}") == V_INVALID);
}

static char price_out[32];
static enum v_result price(struct verr *v, const cJSON *o) { return v_price(v, o, "price", true, price_out); }

TEST(price_rules) {
    CHECK(check_one(price, "{\"price\":0}") == V_VALID);
    CHECK(check_one(price, "{\"price\":-0.01}") == V_INVALID);
    CHECK(check_one(price, "{\"price\":99999999.99}") == V_VALID);
    CHECK_STR(price_out, "99999999.99");
    CHECK(check_one(price, "{\"price\":100000000}") == V_INVALID);
    CHECK(check_one(price, "{\"price\":100000000.00}") == V_INVALID);
    CHECK(check_one(price, "{\"price\":19.99}") == V_VALID);
    CHECK_STR(price_out, "19.99");
    CHECK(check_one(price, "{\"price\":0.1}") == V_VALID);
    CHECK_STR(price_out, "0.10");
    CHECK(check_one(price, "{\"price\":1.234}") == V_INVALID);
    CHECK(check_one(price, "{\"price\":\"19.99\"}") == V_VALID);
    CHECK(check_one(price, "{\"price\":\"0\"}") == V_VALID);
    CHECK(check_one(price, "{\"price\":\"012.5\"}") == V_VALID);
    CHECK_STR(price_out, "12.50");
    CHECK(check_one(price, "{\"price\":\"99999999.99\"}") == V_VALID);
    CHECK(check_one(price, "{\"price\":\"100000000.00\"}") == V_INVALID);
    CHECK(check_one(price, "{\"price\":\"19.999\"}") == V_INVALID);
    CHECK(check_one(price, "{\"price\":\"-1\"}") == V_INVALID);
    CHECK(check_one(price, "{\"price\":\"1e3\"}") == V_INVALID);
    CHECK(check_one(price, "{\"price\":\"12.\"}") == V_INVALID);
    CHECK(check_one(price, "{\"price\":\"abc\"}") == V_INVALID);
    CHECK(check_one(price, "{\"price\":true}") == V_INVALID);
    CHECK(check_one(price, "{\"price\":1e300}") == V_INVALID);
}

static long long int_out;
static enum v_result stock(struct verr *v, const cJSON *o) { return v_int(v, o, "stock", false, 0, 2147483647LL, &int_out); }

TEST(stock_rules) {
    CHECK(check_one(stock, "{\"stock\":0}") == V_VALID);
    CHECK(check_one(stock, "{\"stock\":-1}") == V_INVALID);
    CHECK(check_one(stock, "{\"stock\":2147483647}") == V_VALID);
    CHECK(check_one(stock, "{\"stock\":2147483648}") == V_INVALID);
    CHECK(check_one(stock, "{\"stock\":1.5}") == V_INVALID);
    CHECK(check_one(stock, "{\"stock\":\"3\"}") == V_INVALID);
    CHECK(check_one(stock, "{\"stock\":1e400}") == V_INVALID);
    CHECK(check_one(stock, "{}") == V_ABSENT);
}

TEST(register_rejections_name_every_field) {
    expect_fields(handle_register, "register", "{}", (const char *[]){"name", "email", "password", NULL});
    expect_fields(handle_register, "register",
                  "{\"name\":\"\",\"email\":\"x\",\"password\":\"short\",\"userId\":\"nope\"}",
                  (const char *[]){"name", "email", "password", "userId", NULL});
    expect_fields(handle_register, "register",
                  "{\"name\":\"Ann\",\"email\":\"a@b.co\",\"password\":\"Secret123\",\"userId\":42}",
                  (const char *[]){"userId", NULL});
}

TEST(create_product_rejections_name_every_field) {
    char *d = rep("d", 10001), *c = rep("c", 101), buf[12000];
    snprintf(buf, sizeof buf, "{\"name\":\"n\",\"price\":1,\"description\":\"%s\",\"category\":\"%s\"}", d, c);
    expect_fields(handle_create_product, "createProduct", buf, (const char *[]){"description", "category", NULL});
    free(d);
    free(c);
    expect_fields(handle_create_product, "createProduct", "{}", (const char *[]){"name", "price", NULL});
    expect_fields(handle_create_product, "createProduct",
                  "{\"name\":\"n\",\"price\":\"1.001\",\"stock\":-1,\"productId\":\"x\"}",
                  (const char *[]){"price", "stock", "productId", NULL});
    expect_fields(handle_create_product, "createProduct", "{\"name\":[],\"price\":{},\"description\":1,\"category\":2}",
                  (const char *[]){"name", "price", "description", "category", NULL});
}

TEST(create_product_length_boundaries_accept) {
    /* description 10000 and category 100 pass validation (checked through the verr API) */
    char *d = rep("d", 10000), *c = rep("c", 100), buf[12000];
    snprintf(buf, sizeof buf, "{\"description\":\"%s\",\"category\":\"%s\"}", d, c);
    cJSON *o = cJSON_Parse(buf);
    struct verr v = {0};
    char *sd, *sc;
    CHECK(v_string(&v, o, "description", false, false, 0, 10000, &sd) == V_VALID);
    CHECK(v_string(&v, o, "category", false, true, 0, 100, &sc) == V_VALID);
    CHECK(!verr_any(&v));
    free(sd);
    free(sc);
    free(d);
    free(c);
    cJSON_Delete(o);
}

static enum v_result qty(struct verr *v, const cJSON *o) {
    return v_int(v, o, "quantityChange", true, -1000000000LL, 1000000000LL, &int_out);
}

TEST(update_stock_rules) {
    CHECK(check_one(qty, "{\"quantityChange\":1000000000}") == V_VALID);
    CHECK(check_one(qty, "{\"quantityChange\":1000000001}") == V_INVALID);
    CHECK(check_one(qty, "{\"quantityChange\":-1000000000}") == V_VALID);
    CHECK(check_one(qty, "{\"quantityChange\":-1000000001}") == V_INVALID);
    CHECK(check_one(qty, "{\"quantityChange\":1.5}") == V_INVALID);
    CHECK(check_one(qty, "{\"quantityChange\":\"1\"}") == V_INVALID);
    expect_fields(handle_update_stock, "updateStock", "{\"productId\":\"" "5f0c6a8e-8a9b-4f0e-9d3c-1f2e3d4c5b6a" "\",\"quantityChange\":0}",
                  (const char *[]){"quantityChange", NULL});
    expect_fields(handle_update_stock, "updateStock", "{}", (const char *[]){"productId", "quantityChange", NULL});
    expect_fields(handle_update_stock, "updateStock", "{\"productId\":\"nope\",\"quantityChange\":1e12}",
                  (const char *[]){"productId", "quantityChange", NULL});
}

#define PID "5f0c6a8e-8a9b-4f0e-9d3c-1f2e3d4c5b6a"
#define PID2 "5f0c6a8e-8a9b-4f0e-9d3c-1f2e3d4c5b6b"

TEST(place_order_rules) {
    expect_fields(handle_place_order, "placeOrder", "{}", (const char *[]){"userId", "items", NULL});
    expect_fields(handle_place_order, "placeOrder", "{\"userId\":\"" PID "\",\"items\":[]}",
                  (const char *[]){"items", NULL});
    expect_fields(handle_place_order, "placeOrder", "{\"userId\":\"" PID "\",\"items\":{}}",
                  (const char *[]){"items", NULL});
    expect_fields(handle_place_order, "placeOrder",
                  "{\"userId\":\"" PID "\",\"items\":[{\"productId\":\"" PID "\",\"quantity\":0},"
                  "{\"productId\":\"" PID "\",\"quantity\":1000000001},7]}",
                  (const char *[]){"items[0].quantity", "items[1].productId", "items[1].quantity", "items[2]", NULL});
    /* 100 items pass validation, 101 do not */
    char buf[20000];
    for (int n = 100; n <= 101; n++) {
        size_t len = (size_t)snprintf(buf, sizeof buf, "{\"userId\":\"" PID "\",\"items\":[");
        for (int i = 0; i < n; i++)
            len += (size_t)snprintf(buf + len, sizeof buf - len, "%s{\"productId\":\"5f0c6a8e-8a9b-4f0e-9d3c-%012d\","
                                    "\"quantity\":1}", i ? "," : "", i);
        snprintf(buf + len, sizeof buf - len, "]}");
        if (n == 100) {
            cJSON *p = cJSON_Parse(buf);
            cJSON_AddTrueToObject(p, "__valid");
            CHECK(rejected_fields(handle_place_order, "placeOrder", p) == NULL);
        } else {
            expect_fields(handle_place_order, "placeOrder", buf, (const char *[]){"items", NULL});
        }
    }
}

TEST(update_product_rules) {
    expect_fields(handle_update_product, "updateProduct", "{\"productId\":\"" PID "\"}", (const char *[]){"payload", NULL});
    expect_fields(handle_update_product, "updateProduct",
                  "{\"productId\":\"" PID "\",\"status\":\"SOLD\",\"price\":\"1.234\",\"name\":\" \"}",
                  (const char *[]){"status", "price", "name", NULL});
    expect_fields(handle_update_product, "updateProduct", "{\"status\":\"active\"}",
                  (const char *[]){"productId", "status", NULL});
}

TEST(change_password_rules) {
    expect_fields(handle_change_password, "changePassword", "{}",
                  (const char *[]){"userId", "currentPassword", "newPassword", NULL});
    expect_fields(handle_change_password, "changePassword",
                  "{\"userId\":\"" PID2 "\",\"currentPassword\":\"x\",\"newPassword\":\"alllowercase1\"}",
                  (const char *[]){"newPassword", NULL});
}

TEST_MAIN()
