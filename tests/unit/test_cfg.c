/* test_cfg.c - the queues.conf loader: a good file, each kind of bad file, env overrides. */
#include "core.h"
#include "test.h"

#include <unistd.h>

static char path[64];
static char err[1024];

/* Writes text to a temporary file and loads it. */
static int load_text(const char *text, struct cfg *c) {
    snprintf(path, sizeof path, "/tmp/conveyor-test-%d.conf", (int)getpid());
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) == EOF || fclose(f) != 0) {
        perror(path);
        exit(1);
    }
    err[0] = '\0';
    int rc = cfg_load(path, c, err, sizeof err);
    unlink(path);
    return rc;
}

#define MINIMAL "queues = ( { name = \"q\"; commands = [\"register\"]; } );\n"

static void clear_env(void) {
    unsetenv("CONVEYOR_TRANSPORT");
    unsetenv("CONVEYOR_EVENTS_TRANSPORT");
    unsetenv("CONVEYOR_DATABASE_URL");
    unsetenv("CONVEYOR_RABBITMQ_URL");
    unsetenv("CONVEYOR_REDIS_URL");
    unsetenv("CONVEYOR_DATABASE_URL_FILE");
    unsetenv("CONVEYOR_RABBITMQ_URL_FILE");
    unsetenv("CONVEYOR_REDIS_URL_FILE");
}

TEST(repository_file_loads) {
    clear_env();
    struct cfg c;
    CHECK(cfg_load("../queues.conf", &c, err, sizeof err) == 0);
    CHECK(c.nqueues == 3);
    CHECK_STR(cfg_queue_for(&c, "register")->name, "users");
    CHECK_STR(cfg_queue_for(&c, "changePassword")->name, "users");
    CHECK_STR(cfg_queue_for(&c, "createProduct")->name, "catalog");
    CHECK_STR(cfg_queue_for(&c, "updateStock")->name, "catalog");
    CHECK_STR(cfg_queue_for(&c, "updateProduct")->name, "catalog");
    CHECK_STR(cfg_queue_for(&c, "deleteProduct")->name, "catalog");
    CHECK_STR(cfg_queue_for(&c, "placeOrder")->name, "orders");
    CHECK_STR(cfg_queue_for(&c, "cancelOrder")->name, "orders");
    CHECK(cfg_queue_for(&c, "nope") == NULL);
    CHECK_STR(c.prefix, "conveyor");
    CHECK(c.events_transport == TRANSPORT_RABBITMQ);
    CHECK(c.max_message_bytes == 65536);
    CHECK(c.stock_low_threshold == 10);
    CHECK(c.events_maxlen == 1000000);
    CHECK(c.queues[0].quorum);
    cfg_free(&c);
}

TEST(defaults_apply_to_a_minimal_file) {
    clear_env();
    struct cfg c;
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK(c.queues[0].workers == 2 && c.queues[0].prefetch == 8);
    CHECK(c.queues[0].transport == TRANSPORT_RABBITMQ);
    CHECK_STR(c.database_url, "postgresql://conveyor@127.0.0.1:55432/conveyor");
    CHECK(c.shutdown_timeout_s == 30);
    cfg_free(&c);
}

TEST(syntax_error_names_file_and_line) {
    struct cfg c;
    CHECK(load_text("prefix = \"x\";\nqueues = ( { name = \"q\"; commands = [ } );\n", &c) < 0);
    CHECK(strstr(err, "/tmp/conveyor-test-") != NULL);
    CHECK(strstr(err, ":2:") != NULL);
    CHECK(strstr(err, "syntax error") != NULL);
}

TEST(missing_file_is_named) {
    struct cfg c;
    CHECK(cfg_load("/nonexistent/queues.conf", &c, err, sizeof err) < 0);
    CHECK(strstr(err, "/nonexistent/queues.conf") != NULL);
}

TEST(unknown_top_level_key_refused) {
    struct cfg c;
    CHECK(load_text("colour = \"red\";\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "unknown setting 'colour'") != NULL);
    CHECK(strstr(err, ":1:") != NULL);
}

TEST(unknown_nested_key_refused) {
    struct cfg c;
    CHECK(load_text("database: { url = \"postgresql://x\"; pool = 3; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "unknown setting 'database.pool'") != NULL);
    CHECK(load_text("queues = ( { name = \"q\"; commands = [\"a\"]; wrkers = 3; } );\n", &c) < 0);
    CHECK(strstr(err, "wrkers") != NULL);
}

TEST(wrong_types_refused) {
    struct cfg c;
    CHECK(load_text("prefix = 3;\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "'prefix' must be a string") != NULL);
    CHECK(load_text("queues = ( { name = \"q\"; commands = [\"a\"]; workers = \"two\"; } );\n", &c) < 0);
    CHECK(strstr(err, "workers' must be an integer") != NULL);
    CHECK(load_text("database = \"postgresql://x\";\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "'database' must be a group") != NULL);
    CHECK(load_text("queues = ( { name = \"q\"; commands = \"register\"; } );\n", &c) < 0);
    CHECK(strstr(err, "commands' is required: a list") != NULL);
}

TEST(out_of_range_refused) {
    struct cfg c;
    CHECK(load_text("queues = ( { name = \"q\"; commands = [\"a\"]; workers = 1000; } );\n", &c) < 0);
    CHECK(strstr(err, "between 0 and 256") != NULL);
    CHECK(load_text("limits: { max_message_bytes = 1; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "max_message_bytes") != NULL);
}

TEST(missing_required_values_refused) {
    struct cfg c;
    CHECK(load_text("prefix = \"x\";\n", &c) < 0);
    CHECK(strstr(err, "'queues' is required") != NULL);
    CHECK(load_text("queues = ( { commands = [\"a\"]; } );\n", &c) < 0);
    CHECK(strstr(err, "name' is required") != NULL);
    CHECK(load_text("queues = ( { name = \"q\"; } );\n", &c) < 0);
    CHECK(strstr(err, "commands' is required") != NULL);
    CHECK(load_text("queues = ();\n", &c) < 0);
    CHECK(strstr(err, "at least one queue") != NULL);
}

TEST(bad_values_refused) {
    struct cfg c;
    CHECK(load_text("transport = \"kafka\";\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "\"rabbitmq\" or \"redis\"") != NULL);
    CHECK(load_text("queues = ( { name = \"a b\"; commands = [\"a\"]; } );\n", &c) < 0);
    CHECK(strstr(err, "letters, digits") != NULL);
    CHECK(load_text("queues = ( { name = \"q\"; commands = [\"a\"]; queue_type = \"lazy\"; } );\n", &c) < 0);
    CHECK(strstr(err, "quorum") != NULL);
}

TEST(command_routed_twice_refused) {
    struct cfg c;
    CHECK(load_text("queues = ( { name = \"a\"; commands = [\"register\"]; },\n"
                    "           { name = \"b\"; commands = [\"register\"]; } );\n", &c) < 0);
    CHECK(strstr(err, "command 'register' is routed twice") != NULL);
    CHECK(strstr(err, ":2:") != NULL);
    CHECK(load_text("queues = ( { name = \"a\"; commands = [\"x\"]; }, { name = \"a\"; commands = [\"y\"]; } );\n", &c) < 0);
    CHECK(strstr(err, "queue 'a' is defined twice") != NULL);
}

TEST(environment_overrides_file) {
    clear_env();
    setenv("CONVEYOR_TRANSPORT", "redis", 1);
    setenv("CONVEYOR_DATABASE_URL", "postgresql://other/db", 1);
    setenv("CONVEYOR_REDIS_URL", "redis://10.0.0.1:1/2", 1);
    setenv("CONVEYOR_RABBITMQ_URL", "amqp://u:p@h:1/", 1);
    struct cfg c;
    CHECK(load_text("transport = \"rabbitmq\";\n" MINIMAL, &c) == 0);
    CHECK(c.queues[0].transport == TRANSPORT_REDIS);
    CHECK(c.events_transport == TRANSPORT_REDIS);
    CHECK_STR(c.database_url, "postgresql://other/db");
    CHECK_STR(c.redis_url, "redis://10.0.0.1:1/2");
    CHECK_STR(c.rabbitmq_url, "amqp://u:p@h:1/");
    cfg_free(&c);
    setenv("CONVEYOR_EVENTS_TRANSPORT", "rabbitmq", 1);
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK(c.queues[0].transport == TRANSPORT_REDIS);
    CHECK(c.events_transport == TRANSPORT_RABBITMQ);
    cfg_free(&c);
    setenv("CONVEYOR_TRANSPORT", "kafka", 1);
    CHECK(load_text(MINIMAL, &c) < 0);
    CHECK(strstr(err, "CONVEYOR_TRANSPORT") != NULL);
    clear_env();
}

TEST(rabbitmq_tls_keys) {
    clear_env();
    struct cfg c;
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK(!c.rabbitmq_ca_file && !c.rabbitmq_cert_file && !c.rabbitmq_key_file);
    cfg_free(&c);
    CHECK(load_text("rabbitmq: { url = \"amqps://u:p@h:5671\"; ca_file = \"/ca.pem\";\n"
                    "            cert_file = \"/c.pem\"; key_file = \"/c.key\"; };\n" MINIMAL, &c) == 0);
    CHECK_STR(c.rabbitmq_ca_file, "/ca.pem");
    CHECK_STR(c.rabbitmq_cert_file, "/c.pem");
    CHECK_STR(c.rabbitmq_key_file, "/c.key");
    cfg_free(&c);
    /* a certificate without its key, or the other way round */
    CHECK(load_text("rabbitmq: { url = \"amqps://h\";\n cert_file = \"/c.pem\"; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "'rabbitmq.cert_file' and 'rabbitmq.key_file' go together") != NULL);
    CHECK(strstr(err, ":1:") != NULL);
    CHECK(load_text("rabbitmq: { url = \"amqps://h\"; key_file = \"/c.key\"; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "go together") != NULL);
    CHECK(load_text("rabbitmq: { ca_file = \"\"; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "'rabbitmq.ca_file' must not be empty") != NULL);
    CHECK(load_text("rabbitmq: { tls = true; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "unknown setting 'rabbitmq.tls'") != NULL);
    /* TLS files with a plain URL: refused, also when the URL comes from the environment */
    CHECK(load_text("rabbitmq: { url = \"amqp://h\"; ca_file = \"/ca.pem\"; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "must then be amqps://") != NULL);
    setenv("CONVEYOR_RABBITMQ_URL", "amqp://u:p@h:1/", 1);
    CHECK(load_text("rabbitmq: { url = \"amqps://h\"; ca_file = \"/ca.pem\"; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "must then be amqps://") != NULL && strstr(err, "u:p") == NULL);
    setenv("CONVEYOR_RABBITMQ_URL", "amqps://u:p@h:1/", 1);
    CHECK(load_text("rabbitmq: { ca_file = \"/ca.pem\"; };\n" MINIMAL, &c) == 0);
    CHECK_STR(c.rabbitmq_ca_file, "/ca.pem");
    cfg_free(&c);
    clear_env();
}

TEST(events_transport_follows_default_unless_set) {
    clear_env();
    struct cfg c;
    CHECK(load_text("transport = \"redis\";\n" MINIMAL, &c) == 0);
    CHECK(c.events_transport == TRANSPORT_REDIS);
    cfg_free(&c);
    CHECK(load_text("transport = \"redis\";\nevents: { transport = \"rabbitmq\"; };\n" MINIMAL, &c) == 0);
    CHECK(c.events_transport == TRANSPORT_RABBITMQ && c.queues[0].transport == TRANSPORT_REDIS);
    cfg_free(&c);
}

/* url_redact of url is want. */
static void check_redact(const char *url, const char *want) {
    char out[256];
    url_redact(url, out, sizeof out);
    CHECK_STR(out, want);
}

TEST(url_redact_masks_passwords) {
    check_redact("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/");
    check_redact("postgresql://conveyor@127.0.0.1:5432/conveyor", "postgresql://conveyor@127.0.0.1:5432/conveyor");
    check_redact("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0");
    check_redact("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0");
    check_redact("host=db port=5432 password=s3cret user=u", "host=db port=5432 password=*** user=u");
    check_redact("host=db password = 'a b\\' c' user=u", "host=db password = *** user=u");
    check_redact("postgresql://u@h/db?sslmode=require&password=s3cret&x=1",
                 "postgresql://u@h/db?sslmode=require&password=***&x=1");
    check_redact("postgresql://u:p@h/db?password=q", "postgresql://u:***@h/db?password=***");
    /* a password holding '@', ':' or '/' is masked whole */
    check_redact("amqp://u:p@ss:w/rd@host:5672/vh", "amqp://u:***@host:5672/vh");
    check_redact("postgresql://u:a:b@h/db", "postgresql://u:***@h/db");
    /* not a password: a key that only ends in "password", a user without one */
    check_redact("host=h oldpassword=x", "host=h oldpassword=x");
    check_redact("amqp://guest@h", "amqp://guest@h");
    /* a Redis userinfo without ':' is the password (AUTH s3cret), and libpq's sslpassword */
    check_redact("redis://s3cret@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0");
    check_redact("postgresql://u@h/db?sslmode=verify-full&sslpassword=k3y", "postgresql://u@h/db?sslmode=verify-full&sslpassword=***");
    check_redact("host=h sslpassword=k3y", "host=h sslpassword=***");
    char scrubbed[128];
    url_scrub("WRONGPASS s3cret", "redis://s3cret@h:6379/0", scrubbed, sizeof scrubbed);
    CHECK(strstr(scrubbed, "s3cret") == NULL);
    char small[12];
    url_redact("amqp://guest:secret@host", small, sizeof small);
    CHECK(strlen(small) == 11 && strstr(small, "secret") == NULL);
}

TEST(url_scrub_masks_an_echoed_password) {
    char out[256];
    url_scrub("bad token near \"s3cr%t\" and s3cr%t", "postgresql://u:s3cr%25t@h/db", out, sizeof out);
    CHECK(strstr(out, "s3cr") == NULL);
    url_scrub("missing \"=\" after \"pa ss\"", "host=h password='pa ss'", out, sizeof out);
    CHECK_STR(out, "missing \"=\" after \"***\"");
    url_scrub("connection refused", "redis://127.0.0.1:1/0", out, sizeof out);
    CHECK_STR(out, "connection refused");
}

TEST(url_check_takes_good_urls) {
    char why[256];
    CHECK(url_check(URL_POSTGRES, "postgresql://u:p@127.0.0.1:5432/db", why, sizeof why) == 0);
    CHECK(url_check(URL_POSTGRES, "postgres://h/db", why, sizeof why) == 0);
    CHECK(url_check(URL_POSTGRES, "host=h port=5432 dbname=db password=x", why, sizeof why) == 0);
    CHECK(url_check(URL_POSTGRES, "postgresql://h1:5432,h2:5433/db", why, sizeof why) == 0);
    CHECK(url_check(URL_AMQP, "amqp://guest:guest@127.0.0.1:5672/", why, sizeof why) == 0);
    CHECK(url_check(URL_AMQP, "amqp://h", why, sizeof why) == 0);
    CHECK(url_check(URL_REDIS, "redis://:pw@127.0.0.1:6379/2", why, sizeof why) == 0);
    struct redis_url r;
    CHECK(url_parse_redis("redis://app:p@ss@h:7000/3", &r, why, sizeof why) == 0);
    CHECK_STR(r.user, "app");
    CHECK_STR(r.password, "p@ss");
    CHECK_STR(r.host, "h");
    CHECK(r.port == 7000 && r.db == 3);
}

TEST(url_check_refuses_bad_urls) {
    char why[256];
    CHECK(url_check(URL_POSTGRES, "http://u:secret@h/db", why, sizeof why) == CV_ECONFIG);
    CHECK(strstr(why, "unknown scheme 'http'") != NULL);
    CHECK(url_check(URL_POSTGRES, "postgresql://u:secret@h:54x2/db", why, sizeof why) == CV_ECONFIG);
    CHECK(strstr(why, "port") != NULL && strstr(why, "secret") == NULL);
    CHECK(url_check(URL_POSTGRES, "host=h port=0", why, sizeof why) == CV_ECONFIG);
    CHECK(url_check(URL_POSTGRES, "just-a-word", why, sizeof why) == CV_ECONFIG);
    CHECK(url_check(URL_POSTGRES, "host=h password=secret bogus", why, sizeof why) == CV_ECONFIG);
    CHECK(strstr(why, "secret") == NULL);
    CHECK(url_check(URL_AMQP, "http://guest:secret@h", why, sizeof why) == CV_ECONFIG);
    CHECK(url_check(URL_AMQP, "amqp://guest:secret@h:70000/", why, sizeof why) == CV_ECONFIG);
    CHECK(strstr(why, "port") != NULL && strstr(why, "secret") == NULL);
    CHECK(url_check(URL_AMQP, "amqp://guest:secret@h:12ab/", why, sizeof why) == CV_ECONFIG);
    CHECK(url_check(URL_AMQP, "amqps://guest:secret@h/", why, sizeof why) == 0); /* TLS: README, "TLS" */
    CHECK(url_check(URL_AMQP, "amqps://guest:secret@h:0/", why, sizeof why) == CV_ECONFIG);
    CHECK(url_check(URL_REDIS, "rediss://h", why, sizeof why) == CV_ECONFIG);
    CHECK(url_check(URL_REDIS, "redis://:secret@h:port/0", why, sizeof why) == CV_ECONFIG);
    CHECK(url_check(URL_REDIS, "redis://h:6379/zero", why, sizeof why) == CV_ECONFIG);
    CHECK(url_check(URL_REDIS, "", why, sizeof why) == CV_ECONFIG);
}

TEST(cfg_load_refuses_bad_urls_naming_the_setting) {
    clear_env();
    struct cfg c;
    CHECK(load_text("database: { url = \"http://u:secret@h/db\"; };\n" MINIMAL, &c) == CV_ECONFIG);
    CHECK(strstr(err, "database.url (http://u:***@h/db): unknown scheme 'http'") != NULL);
    CHECK(strstr(err, "secret") == NULL);
    setenv("CONVEYOR_RABBITMQ_URL", "amqp://guest:secret@h:99999/", 1);
    CHECK(load_text(MINIMAL, &c) == CV_ECONFIG);
    CHECK(strstr(err, "CONVEYOR_RABBITMQ_URL (amqp://guest:***@h:99999/)") != NULL);
    CHECK(strstr(err, "port") != NULL && strstr(err, "secret") == NULL);
    /* only the URLs of transports in use are checked: no queue is on Redis here */
    clear_env();
    setenv("CONVEYOR_REDIS_URL", "http://nope", 1);
    CHECK(load_text(MINIMAL, &c) == 0);
    cfg_free(&c);
    setenv("CONVEYOR_TRANSPORT", "redis", 1);
    CHECK(load_text(MINIMAL, &c) == CV_ECONFIG);
    CHECK(strstr(err, "CONVEYOR_REDIS_URL") != NULL);
    clear_env();
}

/* Writes text to a file named for this test; returns its path (static). */
static const char *secret_file(const char *text) {
    static char p[64];
    snprintf(p, sizeof p, "/tmp/conveyor-test-secret-%d", (int)getpid());
    FILE *f = fopen(p, "w");
    CHECK(f != NULL);
    if (!f) return p;
    CHECK(fputs(text, f) >= 0);
    CHECK(fclose(f) == 0);
    return p;
}

TEST(url_files_are_read_and_checked) {
    clear_env();
    struct cfg c;
    const char *p = secret_file("postgresql://u:fil3secret@h:5432/db\n");
    setenv("CONVEYOR_DATABASE_URL_FILE", p, 1);
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK_STR(c.database_url, "postgresql://u:fil3secret@h:5432/db"); /* trailing newline stripped */
    CHECK_STR(c.database_url_setting, "CONVEYOR_DATABASE_URL_FILE");
    cfg_free(&c);
    /* both set */
    setenv("CONVEYOR_DATABASE_URL", "postgresql://h/db", 1);
    CHECK(load_text(MINIMAL, &c) == CV_ECONFIG);
    CHECK(strstr(err, "CONVEYOR_DATABASE_URL and CONVEYOR_DATABASE_URL_FILE are both set") != NULL);
    unsetenv("CONVEYOR_DATABASE_URL");
    /* a bad URL in the file: named by the variable, the secret masked */
    secret_file("http://u:fil3secret@h/db\r\n");
    CHECK(load_text(MINIMAL, &c) == CV_ECONFIG);
    CHECK(strstr(err, "CONVEYOR_DATABASE_URL_FILE (http://u:***@h/db)") != NULL);
    CHECK(strstr(err, "fil3secret") == NULL);
    /* empty, unreadable */
    secret_file("\n");
    CHECK(load_text(MINIMAL, &c) == CV_ECONFIG);
    CHECK(strstr(err, "CONVEYOR_DATABASE_URL_FILE") != NULL && strstr(err, "empty") != NULL);
    unlink(p);
    CHECK(load_text(MINIMAL, &c) == CV_ECONFIG);
    CHECK(strstr(err, "CONVEYOR_DATABASE_URL_FILE: cannot read") != NULL && strstr(err, p) != NULL);
    /* the other two variables */
    clear_env();
    p = secret_file("amqp://guest:fil3secret@h:5672/");
    setenv("CONVEYOR_RABBITMQ_URL_FILE", p, 1);
    setenv("CONVEYOR_REDIS_URL_FILE", p, 1);
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK_STR(c.rabbitmq_url, "amqp://guest:fil3secret@h:5672/");
    cfg_free(&c);
    setenv("CONVEYOR_TRANSPORT", "redis", 1); /* now the Redis URL is used, and it is an amqp:// one */
    CHECK(load_text(MINIMAL, &c) == CV_ECONFIG);
    CHECK(strstr(err, "CONVEYOR_REDIS_URL_FILE (amqp://guest:***@h:5672/): unknown scheme 'amqp'") != NULL);
    CHECK(strstr(err, "fil3secret") == NULL);
    unlink(p);
    clear_env();
}

/* The smallest dedup window the contract states (docs/contract.md §7, README:
 * "at least 1 day") is the smallest the loader takes: 1; 0 is "for ever". */
TEST(dedup_window_is_at_least_one_day) {
    clear_env();
    struct cfg c;
    CHECK(load_text("dedup: { retention_days = 1; };\n" MINIMAL, &c) == 0);
    CHECK(c.dedup_retention_days == 1);
    cfg_free(&c);
    CHECK(load_text("dedup: { retention_days = 36500; };\n" MINIMAL, &c) == 0);
    CHECK(c.dedup_retention_days == 36500);
    cfg_free(&c);
    CHECK(load_text("dedup: { retention_days = 36501; };\n" MINIMAL, &c) < 0);
    CHECK(load_text("dedup: { retention_days = 0.5; };\n" MINIMAL, &c) < 0); /* no fraction of a day */
    CHECK(strstr(err, "'dedup.retention_days' must be an integer") != NULL);
}

TEST(dedup_window_has_defaults_and_bounds) {
    clear_env();
    struct cfg c;
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK(c.dedup_retention_days == 30);
    CHECK(c.dedup_prune_batch == 1000);
    cfg_free(&c);
    CHECK(cfg_load("../queues.conf", &c, err, sizeof err) == 0);
    CHECK(c.dedup_retention_days == 30 && c.dedup_prune_batch == 1000);
    cfg_free(&c);
    CHECK(load_text("dedup: { retention_days = 7; prune_batch = 50; };\n" MINIMAL, &c) == 0);
    CHECK(c.dedup_retention_days == 7 && c.dedup_prune_batch == 50);
    cfg_free(&c);
    CHECK(load_text("dedup: { retention_days = 0; };\n" MINIMAL, &c) == 0); /* 0: kept for ever */
    CHECK(c.dedup_retention_days == 0 && c.dedup_prune_batch == 1000);
    cfg_free(&c);
    CHECK(load_text("dedup: { retention_days = -1; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "'dedup.retention_days' must be between 0 and 36500 (got -1)") != NULL);
    CHECK(strstr(err, ":1:") != NULL);
    CHECK(load_text("dedup: { prune_batch = 0; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "'dedup.prune_batch' must be between 1 and 100000 (got 0)") != NULL);
    CHECK(load_text("dedup: { retention_days = \"30d\"; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "'dedup.retention_days' must be an integer") != NULL);
    CHECK(load_text("dedup: { window = 30; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "unknown setting 'dedup.window'") != NULL);
}

TEST(broker_reply_timeout_has_a_default_and_bounds) {
    clear_env();
    struct cfg c;
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK(c.broker_reply_timeout_ms == 10000);
    cfg_free(&c);
    CHECK(cfg_load("../queues.conf", &c, err, sizeof err) == 0);
    CHECK(c.broker_reply_timeout_ms == 10000);
    cfg_free(&c);
    CHECK(load_text("broker: { reply_timeout_ms = 4000; };\n" MINIMAL, &c) == 0);
    CHECK(c.broker_reply_timeout_ms == 4000);
    cfg_free(&c);
    CHECK(load_text("broker: { reply_timeout_ms = 999; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "'broker.reply_timeout_ms' must be between 1000 and 120000 (got 999)") != NULL);
    CHECK(load_text("broker: { reply_timeout_ms = 120001; };\n" MINIMAL, &c) < 0);
    CHECK(load_text("broker: { heartbeat = 5; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "unknown setting 'broker.heartbeat'") != NULL);
}

TEST_MAIN()

TEST(transaction_limits_have_defaults) {
    clear_env();
    struct cfg c;
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK(c.queues[0].statement_timeout_ms == 30000);
    CHECK(c.queues[0].lock_timeout_ms == 10000);
    CHECK(c.queues[0].idle_in_transaction_timeout_ms == 60000);
    cfg_free(&c);
    CHECK(cfg_load("../queues.conf", &c, err, sizeof err) == 0);
    for (int i = 0; i < c.nqueues; i++)
        CHECK(c.queues[i].statement_timeout_ms > 0 && c.queues[i].idle_in_transaction_timeout_ms > 0);
    cfg_free(&c);
}

TEST(transaction_limits_per_queue) {
    clear_env();
    struct cfg c;
    CHECK(load_text("queues = ( { name = \"a\"; commands = [\"register\"]; statement_timeout_ms = 5000; "
                    "lock_timeout_ms = 0; idle_in_transaction_timeout_ms = 120000; },\n"
                    "           { name = \"b\"; commands = [\"placeOrder\"]; } );\n", &c) == 0);
    CHECK(c.queues[0].statement_timeout_ms == 5000);
    CHECK(c.queues[0].lock_timeout_ms == 0);
    CHECK(c.queues[0].idle_in_transaction_timeout_ms == 120000);
    CHECK(c.queues[1].statement_timeout_ms == 30000 && c.queues[1].lock_timeout_ms == 10000);
    cfg_free(&c);
    /* a statement_timeout_ms under the default lock_timeout_ms takes the lock wait down with it */
    CHECK(load_text("queues = ( { name = \"q\"; commands = [\"a\"]; statement_timeout_ms = 500; } );\n", &c) == 0);
    CHECK(c.queues[0].lock_timeout_ms == 500);
    cfg_free(&c);
}

TEST(transaction_limits_out_of_range_refused) {
    struct cfg c;
    CHECK(load_text("queues = ( { name = \"q\"; commands = [\"a\"]; statement_timeout_ms = 0; } );\n", &c) < 0);
    CHECK(strstr(err, "statement_timeout_ms' must be between 100 and 86400000 (got 0)") != NULL);
    CHECK(strstr(err, ":1:") != NULL);
    CHECK(load_text("queues = ( { name = \"q\"; commands = [\"a\"]; statement_timeout_ms = 86400001; } );\n", &c) < 0);
    CHECK(strstr(err, "statement_timeout_ms") != NULL);
    CHECK(load_text("queues = ( { name = \"q\"; commands = [\"a\"]; lock_timeout_ms = -1; } );\n", &c) < 0);
    CHECK(strstr(err, "lock_timeout_ms' must be between 0 and 86400000") != NULL);
    CHECK(load_text("queues = ( { name = \"q\"; commands = [\"a\"]; idle_in_transaction_timeout_ms = 999; } );\n",
                    &c) < 0);
    CHECK(strstr(err, "idle_in_transaction_timeout_ms' must be between 1000 and 86400000") != NULL);
    CHECK(load_text("queues = ( { name = \"q\"; commands = [\"a\"]; statement_timeout_ms = \"30s\"; } );\n", &c) < 0);
    CHECK(strstr(err, "statement_timeout_ms' must be an integer") != NULL);
    CHECK(load_text("queues = ( { name = \"q\"; commands = [\"a\"]; statement_timeout_ms = 1000;\n"
                    "             lock_timeout_ms = 2000; } );\n", &c) < 0);
    CHECK(strstr(err, "lock_timeout_ms' must not be above its statement_timeout_ms (1000)") != NULL);
    CHECK(strstr(err, ":2:") != NULL);
}

TEST(http_listen_is_off_unless_set_and_checked) {
    clear_env();
    struct cfg c;
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK(c.http_listen == NULL);
    cfg_free(&c);
    CHECK(load_text("http: { listen = \"127.0.0.1:9464\"; };\n" MINIMAL, &c) == 0);
    CHECK_STR(c.http_listen, "127.0.0.1:9464");
    cfg_free(&c);
    CHECK(load_text("http: { listen = \"[::1]:9464\"; };\n" MINIMAL, &c) == 0);
    char host[64];
    int port;
    bool v6;
    CHECK(cfg_http_address(c.http_listen, host, sizeof host, &port, &v6));
    CHECK_STR(host, "::1");
    CHECK(port == 9464 && v6);
    cfg_free(&c);
    const char *bad[] = {"localhost:9464", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:94x",
                         "::1:9464", "[::1]9464", ":9464", "999.0.0.1:80"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char text[256];
        snprintf(text, sizeof text, "http: { listen = \"%s\"; };\n%s", bad[i], MINIMAL);
        CHECK(load_text(text, &c) < 0);
        CHECK(strstr(err, "'http.listen' must be") != NULL);
        CHECK(strstr(err, ":1:") != NULL);
    }
    CHECK(load_text("http: { port = 9464; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "unknown setting 'http.port'") != NULL);
}

TEST(rabbitmq_url_lists_the_nodes_of_a_cluster) {
    clear_env();
    struct cfg c;
    CHECK(load_text("rabbitmq: { url = [\"amqp://u:s3cret@n1:5672\", \"amqp://u:s3cret@n2:5672\", "
                    "\"amqp://u:s3cret@n3\"]; };\n" MINIMAL, &c) == 0);
    CHECK_STR(c.rabbitmq_url, "amqp://u:s3cret@n1:5672,amqp://u:s3cret@n2:5672,amqp://u:s3cret@n3");
    CHECK(url_list_count(c.rabbitmq_url) == 3);
    char item[256], shown[512];
    CHECK(url_list_item(c.rabbitmq_url, 1, item, sizeof item));
    CHECK_STR(item, "amqp://u:s3cret@n2:5672");
    CHECK(!url_list_item(c.rabbitmq_url, 3, item, sizeof item));
    CHECK(!url_list_item(c.rabbitmq_url, 0, item, 8)); /* does not fit */
    url_redact(c.rabbitmq_url, shown, sizeof shown);
    CHECK_STR(shown, "amqp://u:***@n1:5672, amqp://u:***@n2:5672, amqp://u:***@n3");
    char scrubbed[256];
    url_scrub("login failed for s3cret at n2", c.rabbitmq_url, scrubbed, sizeof scrubbed);
    CHECK(strstr(scrubbed, "s3cret") == NULL);
    cfg_free(&c);
    /* the environment: commas, spaces around them cut */
    setenv("CONVEYOR_RABBITMQ_URL", "amqp://a:1, amqp://b:2", 1);
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK(url_list_count(c.rabbitmq_url) == 2);
    CHECK(url_list_item(c.rabbitmq_url, 1, item, sizeof item));
    CHECK_STR(item, "amqp://b:2");
    cfg_free(&c);
    /* a bad node is named by its place; mixed TLS refused; an empty item refused */
    setenv("CONVEYOR_RABBITMQ_URL", "amqp://u:s3cret@a:1,amqp://u:s3cret@b:99999", 1);
    CHECK(load_text(MINIMAL, &c) == CV_ECONFIG);
    CHECK(strstr(err, "URL 2 of the list") != NULL && strstr(err, "s3cret") == NULL);
    setenv("CONVEYOR_RABBITMQ_URL", "amqp://a:1,amqps://b:2", 1);
    CHECK(load_text(MINIMAL, &c) == CV_ECONFIG);
    CHECK(strstr(err, "every URL is amqp://") != NULL);
    /* a comma in a password is part of its URL: only ", amqp(s)://" starts the next one */
    setenv("CONVEYOR_RABBITMQ_URL", "amqp://u:se,cret@a:1", 1);
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK(url_list_count(c.rabbitmq_url) == 1);
    url_redact(c.rabbitmq_url, shown, sizeof shown);
    CHECK_STR(shown, "amqp://u:***@a:1");
    cfg_free(&c);
    setenv("CONVEYOR_RABBITMQ_URL", "amqp://u:se,cret@a:99999", 1);
    CHECK(load_text(MINIMAL, &c) == CV_ECONFIG);
    CHECK(strstr(err, "se,cret") == NULL && strstr(err, "cret") == NULL);
    setenv("CONVEYOR_RABBITMQ_URL", "amqp://u:p,q@a:1,amqps://u:p@b:2", 1);
    CHECK(load_text(MINIMAL, &c) == CV_ECONFIG);
    CHECK(strstr(err, "every URL is amqp://") != NULL);
    clear_env();
    CHECK(load_text("rabbitmq: { url = [\"amqp://a\", 3]; };\n" MINIMAL, &c) < 0);
    CHECK(load_text("rabbitmq: { url = []; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "'rabbitmq.url' must be a string or a list of strings") != NULL);
}

TEST(redis_sentinel_urls) {
    char why[256];
    struct redis_url r;
    CHECK(url_parse_redis("redis-sentinel://:pw@s1:26380,s2,s3:5000/mymaster/2", &r, why, sizeof why) == 0);
    CHECK(r.nsentinels == 3);
    CHECK_STR(r.sentinels[0].host, "s1");
    CHECK(r.sentinels[0].port == 26380 && r.sentinels[1].port == 26379 && r.sentinels[2].port == 5000);
    CHECK_STR(r.sentinels[2].host, "s3");
    CHECK_STR(r.master, "mymaster");
    CHECK_STR(r.password, "pw");
    CHECK(r.db == 2);
    CHECK(url_parse_redis("redis-sentinel://s1/m", &r, why, sizeof why) == 0);
    CHECK(r.nsentinels == 1 && r.db == 0 && !r.password[0]);
    CHECK_STR(r.master, "m");
    CHECK(url_parse_redis("redis-sentinel://s1,s2", &r, why, sizeof why) == CV_ECONFIG); /* no master */
    CHECK(strstr(why, "/master") != NULL);
    CHECK(url_parse_redis("redis-sentinel://s1:0/m", &r, why, sizeof why) == CV_ECONFIG);
    CHECK(url_parse_redis("redis-sentinel://s1,,s2/m", &r, why, sizeof why) == CV_ECONFIG);
    CHECK(url_parse_redis("redis-sentinel://s1,/m", &r, why, sizeof why) == CV_ECONFIG); /* a trailing comma */
    CHECK(strstr(why, "empty") != NULL);
    CHECK(url_parse_redis("redis-sentinel:///m", &r, why, sizeof why) == CV_ECONFIG);
    CHECK(url_parse_redis("redis-sentinel://[::1]:26380,[fe80::1]/m", &r, why, sizeof why) == 0);
    CHECK_STR(r.sentinels[0].host, "::1");
    CHECK(r.sentinels[0].port == 26380 && r.sentinels[1].port == 26379);
    CHECK_STR(r.sentinels[1].host, "fe80::1");
    CHECK(url_parse_redis("redis-sentinel://[::1/m", &r, why, sizeof why) == CV_ECONFIG);
    CHECK(url_parse_redis("redis-sentinel://s1/m/x", &r, why, sizeof why) == CV_ECONFIG);
    char shown[256];
    url_redact("redis-sentinel://secret@s1,s2/m", shown, sizeof shown);
    CHECK_STR(shown, "redis-sentinel://***@s1,s2/m");
    struct cfg c;
    clear_env();
    CHECK(load_text("redis: { url = \"redis-sentinel://:pw@s1,s2/m\"; wait_replicas = 1; wait_timeout_ms = 500; };\n"
                    "transport = \"redis\";\n" MINIMAL, &c) == 0);
    CHECK(c.redis_wait_replicas == 1 && c.redis_wait_timeout_ms == 500);
    CHECK(c.publish_retry_ms == 30000);
    cfg_free(&c);
    CHECK(load_text("redis: { wait_replicas = -1; };\n" MINIMAL, &c) < 0);
    CHECK(load_text("producer: { publish_retry_ms = 0; };\n" MINIMAL, &c) == 0);
    CHECK(c.publish_retry_ms == 0 && c.redis_wait_replicas == 0);
    CHECK(c.spool_max_bytes == 64L * 1024 * 1024);
    cfg_free(&c);
    CHECK(load_text("producer: { spool_max_bytes = 4096; };\n" MINIMAL, &c) == 0);
    CHECK(c.spool_max_bytes == 4096);
    cfg_free(&c);
    CHECK(load_text("producer: { spool_max_bytes = 4095; };\n" MINIMAL, &c) < 0);
    CHECK(load_text("producer: { spool_max_bytes = \"64M\"; };\n" MINIMAL, &c) < 0);
}

/* db_url_hosts: a URL of several hosts is checked for a forked primary at each
 * connection (db_fork.c), a single host is not. */
TEST(database_url_hosts_are_counted) {
    CHECK(db_url_hosts("postgresql://conveyor@db-a:5432,db-b:5433/conveyor?target_session_attrs=read-write") == 2);
    CHECK(db_url_hosts("postgresql://db-a,db-b,db-c/conveyor") == 3);
    CHECK(db_url_hosts("host=a,b port=5432 dbname=conveyor") == 2);
    CHECK(db_url_hosts("hostaddr=127.0.0.1,127.0.0.2 port=1,2") == 2);
    CHECK(db_url_hosts("postgresql://conveyor@127.0.0.1:55432/conveyor") == 1);
    CHECK(db_url_hosts("postgresql:///conveyor") == 1);
    CHECK(db_url_hosts("postgresql://[::1]:5432,[::2]:5432/conveyor") == 2);
    CHECK(db_url_hosts("not a url at all = = =") == 0);
}

#define TWO_QUEUES "queues = ( { name = \"q\"; commands = [\"register\", \"restockReport\"]; } );\n"

TEST(schedules_are_parsed_into_the_struct) {
    clear_env();
    struct cfg c;
    CHECK(load_text(TWO_QUEUES
                    "schedules = (\n"
                    "  { name = \"nightly-restock.v2\"; cron = \"0 3 * * *\"; timezone = \"Europe/Paris\";\n"
                    "    type = \"restockReport\"; payload = \"{\\\"day\\\": \\\"{{slot}}\\\", \\\"n\\\": [1]}\";\n"
                    "    catch_up = \"last\"; catch_up_window = \"15m\"; },\n"
                    "  { name = \"tick\"; every = \"90s\"; type = \"register\"; catch_up = \"all\"; },\n"
                    "  { name = \"secs\"; cron = \"*/10 * * * * *\"; type = \"register\"; catch_up = \"none\"; }\n"
                    ");\n",
                    &c) == 0);
    if (err[0]) fprintf(stderr, "%s\n", err);
    CHECK(c.nschedules == 3);
    if (c.nschedules != 3) return;
    const struct cfg_schedule *a = &c.schedules[0], *b = &c.schedules[1], *s = &c.schedules[2];
    CHECK_STR(a->name, "nightly-restock.v2");
    CHECK(a->kind == SCHEDULE_CRON);
    CHECK_STR(a->cron_text, "0 3 * * *");
    CHECK(a->cron.hours == 1u << 3 && a->cron.minutes == 1 && !a->cron.with_seconds);
    CHECK_STR(a->timezone, "Europe/Paris");
    CHECK_STR(a->type, "restockReport");
    CHECK_STR(a->payload, "{\"day\": \"{{slot}}\", \"n\": [1]}");
    CHECK(a->catch_up == CATCH_UP_LAST && a->catch_up_window_s == 900);
    CHECK_STR(b->name, "tick");
    CHECK(b->kind == SCHEDULE_EVERY && b->every_s == 90 && b->cron_text == NULL);
    CHECK_STR(b->payload, "{}");
    CHECK(b->catch_up == CATCH_UP_ALL && b->catch_up_window_s == 60);
    CHECK(s->kind == SCHEDULE_CRON && s->cron.with_seconds && s->catch_up == CATCH_UP_NONE);
    CHECK_STR(s->timezone, "UTC");
    cfg_free(&c);
    CHECK(c.schedules == NULL && c.nschedules == 0);
    /* none at all: NULL, 0; the repository's file loads with whatever it holds */
    CHECK(load_text(MINIMAL, &c) == 0 && c.schedules == NULL && c.nschedules == 0);
    cfg_free(&c);
    CHECK(load_text(MINIMAL "schedules = ();\n", &c) == 0 && c.nschedules == 0);
    cfg_free(&c);
}

/* A file with one schedule (its fields in body) is refused, the message holding each of words. */
static void schedule_refused(const char *body, const char *const *words) {
    struct cfg c;
    char text[1024];
    snprintf(text, sizeof text, TWO_QUEUES "schedules = (\n  { %s }\n);\n", body);
    int rc = load_text(text, &c);
    bool ok = rc == CV_ECONFIG && strstr(err, ":3:");
    for (const char *const *w = words; *w && ok; w++) ok = strstr(err, *w) != NULL;
    if (!ok) {
        fprintf(stderr, "schedule { %s }: rc %d, err \"%s\"\n", body, rc, err);
        test_failures++;
    }
    if (rc == 0) cfg_free(&c);
}
#define REFUSED(body, ...) schedule_refused(body, (const char *const[]){__VA_ARGS__, NULL})

TEST(bad_schedules_are_refused_naming_schedule_and_field) {
    clear_env();
    REFUSED("name = \"n\"; cron = \"60 * * * *\"; type = \"register\";", "schedule 'n'", "'cron'",
            "minute: 60 is out of range 0-59");
    REFUSED("name = \"n\"; cron = \"* * * *\"; type = \"register\";", "'cron'", "expected 5 or 6 fields, got 4");
    REFUSED("name = \"n\"; cron = \"0 3 * * *\"; timezone = \"Mars/Olympus\"; type = \"register\";",
            "schedule 'n'", "'timezone'", "Mars/Olympus");
    REFUSED("name = \"n\"; every = \"1h\"; timezone = \"UTC\"; type = \"register\";", "schedule 'n'", "'timezone'");
    REFUSED("name = \"n\"; cron = \"0 3 * * *\"; every = \"1h\"; type = \"register\";", "schedule 'n'", "'cron'",
            "'every'", "both");
    REFUSED("name = \"n\"; type = \"register\";", "schedule 'n'", "'cron' or 'every' is required");
    REFUSED("name = \"n\"; every = \"0s\"; type = \"register\";", "'every'", "duration");
    REFUSED("name = \"n\"; every = \"soon\"; type = \"register\";", "'every'", "duration");
    REFUSED("name = \"n\"; every = 60; type = \"register\";", "'every' must be a non-empty string");
    REFUSED("name = \"n\"; every = \"1h\"; type = \"nope\";", "schedule 'n'", "'type'", "nope", "routed by no queue");
    REFUSED("name = \"n\"; every = \"1h\";", "schedule 'n'", "'type' is required");
    REFUSED("name = \"n\"; every = \"1h\"; type = \"register\"; payload = \"[1]\";", "schedule 'n'", "'payload'",
            "JSON object");
    REFUSED("name = \"n\"; every = \"1h\"; type = \"register\"; payload = \"{nope\";", "'payload'", "JSON object");
    REFUSED("name = \"n\"; every = \"1h\"; type = \"register\"; catch_up = \"some\";", "'catch_up'", "\"all\"");
    REFUSED("name = \"n\"; every = \"1h\"; type = \"register\"; catch_up_window = \"0s\";", "'catch_up_window'");
    REFUSED("every = \"1h\"; type = \"register\";", "schedule schedules.[0]", "'name' is required");
    REFUSED("name = \"a b\"; every = \"1h\"; type = \"register\";", "schedule schedules.[0]", "'name' must be");
    REFUSED("name = \"n\"; every = \"1h\"; type = \"register\"; colour = \"red\";", "unknown setting",
            "schedules.[0].colour");
    /* a name used twice: the second is named */
    struct cfg c;
    CHECK(load_text(TWO_QUEUES "schedules = ( { name = \"n\"; every = \"1h\"; type = \"register\"; },\n"
                    "  { name = \"n\"; every = \"2h\"; type = \"register\"; } );\n", &c) == CV_ECONFIG);
    CHECK(strstr(err, ":3:") && strstr(err, "schedule 'n' (schedules.[1])") && strstr(err, "'name' is used twice"));
    CHECK(load_text(TWO_QUEUES "schedules = { name = \"n\"; };\n", &c) == CV_ECONFIG);
    CHECK(strstr(err, "'schedules' must be a list") != NULL);
}

TEST(max_length_bounds_a_queue) {
    clear_env();
    unsetenv("CONVEYOR_RABBITMQ_MANAGEMENT_URL");
    struct cfg c;
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK(c.queues[0].max_length == 0); /* unbounded by default */
    CHECK(c.rabbitmq_management_url == NULL);
    cfg_free(&c);
    CHECK(load_text("rabbitmq: { management_url = \"http://u:p@h:15672\"; };\n"
                    "queues = ( { name = \"q\"; commands = [\"register\"]; max_length = 1000; } );\n", &c) == 0);
    CHECK(c.queues[0].max_length == 1000);
    CHECK_STR(c.rabbitmq_management_url, "http://u:p@h:15672");
    cfg_free(&c);
    setenv("CONVEYOR_RABBITMQ_MANAGEMENT_URL", "http://e:f@g:1", 1);
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK_STR(c.rabbitmq_management_url, "http://e:f@g:1");
    cfg_free(&c);
    unsetenv("CONVEYOR_RABBITMQ_MANAGEMENT_URL");
    CHECK(load_text("queues = ( { name = \"q\"; commands = [\"a\"]; max_length = -1; } );\n", &c) < 0);
    CHECK(strstr(err, "max_length") != NULL);
}

/* The database breaker's group: defaults, a setting taken, a cap below the base refused. */
TEST(breaker_group) {
    clear_env();
    struct cfg c;
    CHECK(load_text(MINIMAL, &c) == 0);
    CHECK(c.breaker_failures == 3 && c.breaker_backoff_ms == 1000 && c.breaker_max_backoff_ms == 15000);
    cfg_free(&c);
    CHECK(load_text("breaker: { failures = 5; backoff_ms = 200; max_backoff_ms = 800; };\n" MINIMAL, &c) == 0);
    CHECK(c.breaker_failures == 5 && c.breaker_backoff_ms == 200 && c.breaker_max_backoff_ms == 800);
    cfg_free(&c);
    CHECK(load_text("breaker: { backoff_ms = 2000; max_backoff_ms = 1000; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "'breaker.max_backoff_ms' must not be below 'breaker.backoff_ms'") != NULL);
    CHECK(load_text("breaker: { failures = 0; };\n" MINIMAL, &c) < 0);
    CHECK(strstr(err, "failures") != NULL);
    CHECK(load_text("breaker: { threshold = 3; };\n" MINIMAL, &c) < 0);
}
