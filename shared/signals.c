/* signals.c - SIGTERM / SIGINT as a stop request. */
#include "core.h"

#include <signal.h>
#include <string.h>

static volatile sig_atomic_t *stop_flag;

static void on_stop(int sig) {
    (void)sig;
    if (stop_flag) *stop_flag = 1;
}

void signals_stop_sets(volatile sig_atomic_t *flag) {
    stop_flag = flag;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    (void)sigaction(SIGTERM, &sa, NULL); /* fails only for an invalid signal */
    (void)sigaction(SIGINT, &sa, NULL);
}
