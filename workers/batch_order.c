/* batch_order.c - the order in which a batch takes its row locks: by the row
 * each command locks first (handler_lock_key), stable, so that concurrent
 * batches take their locks in one order and never deadlock, and commands on
 * one aggregate keep their arrival order. Pure: no database, no broker
 * (tests/unit/test_batch_order.c). */
#include "workers.h"

#include <string.h>

bool batch_locks_several(struct batch_item *const *v, int n) {
    for (int i = 0; i < n; i++)
        if (v[i]->handler->locks == LOCKS_ITEM_PRODUCTS || v[i]->handler->locks == LOCKS_ORDER_PRODUCTS) return true;
    return false;
}

void batch_order(struct batch_item **v, int n) {
    if (batch_locks_several(v, n)) return; /* lock_batch takes every product first: arrival order is kept */
    for (int i = 1; i < n; i++) { /* insertion sort: stable, and batches are short */
        struct batch_item *x = v[i];
        int j = i;
        for (; j > 0 && strcmp(v[j - 1]->key, x->key) > 0; j--) v[j] = v[j - 1];
        v[j] = x;
    }
}
