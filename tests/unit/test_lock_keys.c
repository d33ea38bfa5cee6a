/* test_lock_keys.c - the row a command locks first (handler_lock_key) and the
 * rows a batch locks up front (handler_lock_rows), workers/domain/handler.c. */
#include "domain.h"
#include "test.h"

#define P1 "11111111-1111-4111-8111-111111111111"
#define P2 "22222222-2222-4222-8222-222222222222"
#define P3 "33333333-3333-4333-8333-333333333333"

/* handler_lock_key for the command type on the payload text. */
static void key_of(const char *type, const char *json, char out[ID_LEN + 3]) {
    const struct handler *h = handler_find(type);
    CHECK(h != NULL);
    cJSON *p = cJSON_Parse(json);
    CHECK(p != NULL);
    out[0] = 'x';
    if (h && p) handler_lock_key(h, p, out);
    cJSON_Delete(p);
}

TEST(a_product_command_locks_its_product) {
    char k[ID_LEN + 3];
    const char *types[] = {"createProduct", "updateProduct", "updateStock", "deleteProduct"};
    for (size_t i = 0; i < sizeof types / sizeof *types; i++) {
        key_of(types[i], "{\"productId\":\"" P2 "\",\"quantityChange\":1}", k);
        CHECK_STR(k, "p:" P2);
    }
}

TEST(a_user_command_locks_its_user) {
    char k[ID_LEN + 3];
    key_of("changePassword", "{\"userId\":\"" P1 "\",\"password\":\"x\"}", k);
    CHECK_STR(k, "u:" P1);
    key_of("register", "{\"userId\":\"" P3 "\",\"email\":\"a@b.c\"}", k);
    CHECK_STR(k, "u:" P3);
}

TEST(an_order_locks_first_its_least_product) {
    char k[ID_LEN + 3];
    key_of("placeOrder", "{\"items\":[{\"productId\":\"" P3 "\"},{\"productId\":\"" P1 "\"},{\"productId\":\"" P2
                         "\"}]}", k);
    CHECK_STR(k, "p:" P1);
}

TEST(ids_case_folded_so_one_row_has_one_key) {
    char lower[ID_LEN + 3], upper[ID_LEN + 3];
    key_of("updateStock", "{\"productId\":\"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa\"}", lower);
    key_of("updateStock", "{\"productId\":\"AAAAAAAA-AAAA-4AAA-8AAA-AAAAAAAAAAAA\"}", upper);
    CHECK_STR(lower, upper);
}

TEST(no_key_when_the_payload_names_no_uuid) {
    char k[ID_LEN + 3];
    key_of("updateStock", "{\"productId\":\"not-a-uuid\"}", k);
    CHECK_STR(k, "");
    key_of("updateStock", "{}", k);
    CHECK_STR(k, "");
    key_of("placeOrder", "{\"items\":\"nope\"}", k);
    CHECK_STR(k, "");
    key_of("cancelOrder", "{\"orderId\":\"" P1 "\"}", k); /* its products are known from the database only */
    CHECK_STR(k, "");
}

TEST(lock_rows_name_the_products_and_orders_a_batch_locks_first) {
    cJSON *products = cJSON_CreateArray(), *orders = cJSON_CreateArray();
    cJSON *order = cJSON_Parse("{\"items\":[{\"productId\":\"" P2 "\"},{\"productId\":\"bad\"},{\"productId\":\"" P1
                               "\"}]}");
    cJSON *cancel = cJSON_Parse("{\"orderId\":\"" P3 "\"}");
    cJSON *stock = cJSON_Parse("{\"productId\":\"" P3 "\"}");
    handler_lock_rows(handler_find("placeOrder"), order, products, orders);
    handler_lock_rows(handler_find("cancelOrder"), cancel, products, orders);
    handler_lock_rows(handler_find("updateStock"), stock, products, orders);
    CHECK(cJSON_GetArraySize(products) == 3);
    CHECK(cJSON_GetArraySize(orders) == 1);
    CHECK_STR(cJSON_GetArrayItem(products, 0)->valuestring, P2);
    CHECK_STR(cJSON_GetArrayItem(products, 1)->valuestring, P1);
    CHECK_STR(cJSON_GetArrayItem(products, 2)->valuestring, P3);
    CHECK_STR(cJSON_GetArrayItem(orders, 0)->valuestring, P3);
    cJSON_Delete(order);
    cJSON_Delete(cancel);
    cJSON_Delete(stock);
    cJSON_Delete(products);
    cJSON_Delete(orders);
}

TEST_MAIN()
