/* durable.h - conveyor-subscribe's durable modes (--name): durable_subscription.c. */
#ifndef CONVEYOR_DURABLE_H
#define CONVEYOR_DURABLE_H

#include <stdbool.h>

struct durable_options {
    const char *config, *transport, *name, *from, *exec;
    const char *const *patterns; /* npatterns of them (borrowed) */
    int npatterns;
    int partitions, max_attempts, retry_base_ms; /* 0: the defaults */
    int window, exec_timeout_s;
    bool acks;
    long count;       /* stop after this many events settled (< 0: never) */
    double timeout_s; /* stop (status 4) after this long without an event (0: never) */
};

/* Runs the subscription d->name until a signal, COUNT, the timeout, or (with
 * acks) the end of stdin. Returns the exit status: 0, 2 (usage, configuration,
 * a subscription that exists otherwise), 3 (the broker or the database could
 * not be reached at start), 4 (the timeout). */
int durable_run(const struct durable_options *d);

#endif
