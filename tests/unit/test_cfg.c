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
