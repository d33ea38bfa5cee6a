/* test_json_check.c - the strict RFC 8259 check run before any message is
 * parsed (shared/json_check.c): what it accepts, what it refuses and why. */
#include "core.h"
#include "test.h"

static bool ok(const char *s) {
    const char *why = "unset";
    bool r = json_check(s, strlen(s), JSON_MAX_DEPTH, &why);
    CHECK(r ? why == NULL : why != NULL);
    return r;
}

TEST(accepts_one_value_of_each_kind) {
    CHECK(ok("{}"));
    CHECK(ok("[]"));
    CHECK(ok("{\"a\":[1,-2.5e3,true,false,null,\"x\"]}"));
    CHECK(ok("  {\"id\": \"\\u00e9\\ud83d\\ude00\"}  \n"));
    CHECK(ok("0"));
    CHECK(ok("\"text\""));
}

TEST(refuses_what_rfc_8259_forbids) {
    CHECK(!ok(""));
    CHECK(!ok("{} {}"));            /* two values */
    CHECK(!ok("{\"a\":01}"));       /* leading zero */
    CHECK(!ok("{\"a\":1.}"));       /* no digit after the point */
    CHECK(!ok("{\"a\":.5}"));
    CHECK(!ok("{\"a\":1,}"));       /* trailing comma */
    CHECK(!ok("{'a':1}"));
    CHECK(!ok("{\"a\":\"\x01\"}")); /* raw control character */
    CHECK(!ok("{\"a\":\"\\ud83d\"}")); /* lone surrogate */
    CHECK(!ok("{\"a\":\"\\x41\"}")); /* unknown escape */
    CHECK(!ok("{\"a\":NaN}"));
    CHECK(!ok("{\"a\":tru}"));
    CHECK(!ok("[1 2]"));
    CHECK(!ok("{\"a\" 1}"));
}

TEST(nesting_is_bounded) {
    char deep[2 * 600 + 1];
    for (int i = 0; i < 600; i++) deep[i] = '[';
    for (int i = 0; i < 600; i++) deep[600 + i] = ']';
    deep[1200] = '\0';
    const char *why = NULL;
    CHECK(!json_check(deep, strlen(deep), JSON_MAX_DEPTH, &why) && why != NULL);
    CHECK(json_check(deep + 100, 1000, 600, NULL)); /* 500 deep under a bound of 600; why may be NULL */
}

TEST(length_is_what_counts_not_the_nul) {
    const char s[] = "{\"a\":1}garbage";
    CHECK(json_check(s, 7, JSON_MAX_DEPTH, NULL));
    CHECK(!json_check(s, sizeof s - 1, JSON_MAX_DEPTH, NULL));
    const char nul[] = "{\"a\":\"x\0y\"}";
    CHECK(!json_check(nul, sizeof nul - 1, JSON_MAX_DEPTH, NULL)); /* a raw NUL inside a string */
}

TEST_MAIN()
