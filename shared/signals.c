/* signals.c - SIGTERM / SIGINT as a stop request. */
#include "core.h"

#include <signal.h>
#include <string.h>

static volatile int *stop_flag;

static void on_stop(int sig) {
    (void)sig;
    if (stop_flag) *stop_flag = 1;
}

void signals_stop_sets(volatile int *flag) {
    stop_flag = flag;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
}
