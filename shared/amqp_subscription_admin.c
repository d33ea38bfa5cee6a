/* amqp_subscription_admin.c - a durable subscription's counts and its
 * removal on RabbitMQ (docs/contract.md section 13). NOT BUILT YET: stubs. */
#include "amqp_internal.h"

int amqp_subscription_counts(struct broker *b, const struct subscription_spec *s, struct subscription_counts *out) {
    (void)s;
    (void)out;
    return broker_fail(b, CV_EREFUSED, "subscription counts: not built yet");
}

int amqp_subscription_remove(struct broker *b, const struct subscription_spec *s) {
    (void)s;
    return broker_fail(b, CV_EREFUSED, "subscription removal: not built yet");
}
