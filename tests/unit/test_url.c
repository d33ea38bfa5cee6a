/* test_url.c - connection URLs: masking, scrubbing, syntax checks, Redis and
 * Sentinel URLs, and RabbitMQ node lists (shared/url.c), with no server. */
#include "core.h"
#include "test.h"

static char out[1024], why[512];

TEST(redact_masks_the_password_of_every_form) {
    url_redact("postgresql://conveyor:s3cret@db:5432/conveyor", out, sizeof out);
    CHECK(strstr(out, "s3cret") == NULL && strstr(out, "***") != NULL);
    url_redact("amqp://guest:hunter22@mq:5672/%2f", out, sizeof out);
    CHECK(strstr(out, "hunter22") == NULL && strstr(out, "***") != NULL);
    url_redact("redis://:pw-redis-1@cache:6379/0", out, sizeof out);
    CHECK(strstr(out, "pw-redis-1") == NULL);
    url_redact("host=db user=conveyor password=kv-secret dbname=conveyor", out, sizeof out);
    CHECK(strstr(out, "kv-secret") == NULL && strstr(out, "host=db") != NULL);
    url_redact("postgresql://db/conveyor?user=c&password=q-secret", out, sizeof out);
    CHECK(strstr(out, "q-secret") == NULL);
    /* a URL missing its scheme is no URL, but its password is still one */
    url_redact("shop:no-scheme-pw@db/shop", out, sizeof out);
    CHECK(strstr(out, "no-scheme-pw") == NULL && strstr(out, "***") != NULL);
    url_redact("localhost", out, sizeof out);
    CHECK_STR(out, "localhost");
    url_redact(NULL, out, sizeof out);
    CHECK_STR(out, "");
}

TEST(redact_truncates_and_terminates) {
    char small[12];
    url_redact("postgresql://conveyor:s3cret@a-long-host-name:5432/conveyor", small, sizeof small);
    CHECK(strlen(small) < sizeof small);
    CHECK(strstr(small, "s3cret") == NULL);
}

TEST(scrub_removes_the_password_as_written_and_decoded) {
    url_scrub("FATAL: password authentication failed (p@ss w0rd)", "postgresql://u:p%40ss%20w0rd@h/d", out, sizeof out);
    CHECK(strstr(out, "p@ss w0rd") == NULL);
    url_scrub("echo p%40ss%20w0rd", "postgresql://u:p%40ss%20w0rd@h/d", out, sizeof out);
    CHECK(strstr(out, "p%40ss%20w0rd") == NULL);
    url_scrub(NULL, "postgresql://u:x@h/d", out, sizeof out);
    CHECK_STR(out, "");
    url_scrub("nothing secret here", "postgresql://h/d", out, sizeof out);
    CHECK_STR(out, "nothing secret here");
}

TEST(check_accepts_each_kind_and_refuses_bad_ports) {
    CHECK(url_check(URL_POSTGRES, "postgresql://u@127.0.0.1:55432/conveyor", why, sizeof why) == 0);
    CHECK(url_check(URL_POSTGRES, "host=127.0.0.1 port=55432 dbname=conveyor", why, sizeof why) == 0);
    CHECK(url_check(URL_AMQP, "amqp://guest:guest@127.0.0.1:55672", why, sizeof why) == 0);
    CHECK(url_check(URL_AMQP, "amqp://a:1@n1:5672,amqp://a:1@n2:5672", why, sizeof why) == 0);
    CHECK(url_check(URL_REDIS, "redis://127.0.0.1:56379/0", why, sizeof why) == 0);
    CHECK(url_check(URL_REDIS, "redis-sentinel://s1:26379,s2/mymaster", why, sizeof why) == 0);
    CHECK(url_check(URL_AMQP, "amqp://guest:topsecret@h:0", why, sizeof why) == CV_ECONFIG);
    CHECK(strstr(why, "topsecret") == NULL);
    CHECK(url_check(URL_REDIS, "redis://h:70000", why, sizeof why) == CV_ECONFIG);
    CHECK(url_check(URL_REDIS, "http://h", why, sizeof why) == CV_ECONFIG);
}

TEST(parse_redis_defaults_and_fields) {
    struct redis_url u;
    CHECK(url_parse_redis("redis://", &u, why, sizeof why) == 0);
    CHECK_STR(u.host, "127.0.0.1");
    CHECK(u.port == 6379 && u.db == 0 && u.nsentinels == 0);
    CHECK(url_parse_redis("redis://me:pw@cache:7000/3", &u, why, sizeof why) == 0);
    CHECK_STR(u.user, "me");
    CHECK_STR(u.password, "pw");
    CHECK_STR(u.host, "cache");
    CHECK(u.port == 7000 && u.db == 3);
}

TEST(parse_sentinel_lists_every_sentinel_and_the_master) {
    struct redis_url u;
    CHECK(url_parse_redis("redis-sentinel://:pw@s1:26380,s2,[::1]:26381/primary/2", &u, why, sizeof why) == 0);
    CHECK(u.nsentinels == 3);
    CHECK_STR(u.sentinels[0].host, "s1");
    CHECK(u.sentinels[0].port == 26380);
    CHECK_STR(u.sentinels[1].host, "s2");
    CHECK(u.sentinels[1].port == 26379);
    CHECK_STR(u.sentinels[2].host, "::1");
    CHECK(u.sentinels[2].port == 26381);
    CHECK_STR(u.master, "primary");
    CHECK(u.db == 2);
    CHECK_STR(u.password, "pw");
    CHECK(url_parse_redis("redis-sentinel://s1:26379", &u, why, sizeof why) == CV_ECONFIG); /* no master */
}

TEST(list_items_split_before_each_scheme_only) {
    const char *list = "amqp://a:p,w@n1:5672, amqps://b@n2:5671";
    CHECK(url_list_count(list) == 2);
    CHECK(url_list_item(list, 0, out, sizeof out));
    CHECK_STR(out, "amqp://a:p,w@n1:5672"); /* a comma in a password stays in its URL */
    CHECK(url_list_item(list, 1, out, sizeof out));
    CHECK_STR(out, "amqps://b@n2:5671"); /* spaces around it cut */
    CHECK(!url_list_item(list, 2, out, sizeof out));
    char tiny[8];
    CHECK(!url_list_item(list, 0, tiny, sizeof tiny)); /* does not fit */
    CHECK(url_list_count("amqp://only") == 1);
}

TEST_MAIN()
