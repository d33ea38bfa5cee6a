/* amqp_subscription.c - STUB, being written. */
#include "amqp_internal.h"

int amqp_subscription_declare(struct broker *b, const struct subscription_spec *s) {
    (void)s;
    return broker_fail(b, CV_EREFUSED, "not built yet");
}
int amqp_subscription_attach(struct broker *b, const struct subscription_spec *s, int partition, int prefetch) {
    (void)s, (void)partition, (void)prefetch;
    return broker_fail(b, CV_EREFUSED, "not built yet");
}
int amqp_subscription_detach(struct broker *b, int partition) {
    (void)partition;
    return broker_fail(b, CV_EREFUSED, "not built yet");
}
int amqp_subscription_fetch(struct broker *b, struct sub_delivery *out, int max, int timeout_ms) {
    (void)out, (void)max, (void)timeout_ms;
    return broker_fail(b, CV_EREFUSED, "not built yet");
}
int amqp_subscription_ack(struct broker *b, const struct sub_delivery *d) {
    (void)d;
    return broker_fail(b, CV_EREFUSED, "not built yet");
}
void amqp_subscription_free(struct broker *b) { (void)b; }
