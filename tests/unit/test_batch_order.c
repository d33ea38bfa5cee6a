/* test_batch_order.c - the order in which a batch takes its row locks
 * (workers/batch_order.c): by the row each command locks first, stable. */
#include "workers.h"
#include "test.h"

/* Items of the given types and lock keys ("" for none), in arrival order;
 * tag records the arrival index in attempts. */
static void make(struct batch_item *items, struct batch_item **v, int n, const char *const *types,
                 const char *const *keys) {
    for (int i = 0; i < n; i++) {
        memset(&items[i], 0, sizeof items[i]);
        items[i].handler = handler_find(types[i]);
        snprintf(items[i].key, sizeof items[i].key, "%s", keys[i]);
        items[i].attempts = i;
        v[i] = &items[i];
    }
}

TEST(orders_by_the_row_locked_first) {
    struct batch_item items[4], *v[4];
    const char *const types[] = {"updateStock", "updateStock", "changePassword", "updateStock"};
    const char *const keys[] = {"p:c", "p:a", "u:a", "p:b"};
    make(items, v, 4, types, keys);
    batch_order(v, 4);
    CHECK_STR(v[0]->key, "p:a");
    CHECK_STR(v[1]->key, "p:b");
    CHECK_STR(v[2]->key, "p:c");
    CHECK_STR(v[3]->key, "u:a");
}

TEST(commands_on_one_row_keep_their_arrival_order) {
    struct batch_item items[6], *v[6];
    const char *const types[] = {"updateStock", "updateStock", "updateStock",
                                 "updateStock", "updateStock", "updateStock"};
    const char *const keys[] = {"p:b", "p:a", "p:b", "p:a", "p:b", ""};
    make(items, v, 6, types, keys);
    batch_order(v, 6);
    const int want[] = {5, 1, 3, 0, 2, 4}; /* "" (no row) first, then each row's commands as they came */
    for (int i = 0; i < 6; i++) CHECK(v[i]->attempts == want[i]);
}

TEST(a_batch_with_a_multi_product_command_keeps_arrival_order) {
    struct batch_item items[3], *v[3];
    const char *const types[] = {"updateStock", "placeOrder", "updateStock"};
    const char *const keys[] = {"p:c", "p:a", "p:b"};
    make(items, v, 3, types, keys);
    CHECK(batch_locks_several(v, 3));
    batch_order(v, 3);
    for (int i = 0; i < 3; i++) CHECK(v[i]->attempts == i);
    const char *const cancel[] = {"updateStock", "cancelOrder"};
    make(items, v, 2, cancel, keys);
    CHECK(batch_locks_several(v, 2));
    const char *const single[] = {"updateStock", "register", "updateProduct"};
    make(items, v, 3, single, keys);
    CHECK(!batch_locks_several(v, 3));
}

TEST(empty_and_single_batches_are_left_alone) {
    struct batch_item items[1], *v[1];
    const char *const types[] = {"updateStock"};
    const char *const keys[] = {"p:z"};
    batch_order(v, 0);
    make(items, v, 1, types, keys);
    batch_order(v, 1);
    CHECK(v[0] == &items[0]);
}

TEST_MAIN()
