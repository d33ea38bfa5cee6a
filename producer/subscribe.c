/* subscribe.c - conveyor-subscribe: print events as NDJSON, filtered by type. */
#include "core.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile sig_atomic_t stop;

static const char usage[] =
    "usage: conveyor-subscribe [-c FILE] [--transport rabbitmq|redis] [-n COUNT] [--timeout SECONDS] [PATTERN]\n"
    "\n"
    "Prints every event published from now on whose type matches PATTERN, one JSON\n"
    "object per line. PATTERN uses topic syntax: words split by '.', '*' matches one\n"
    "word, '#' any number (default '#', everything). Examples: 'stock.*', 'user.#'.\n"
    "\n"
    "  -c, --config FILE     configuration (default ./queues.conf)\n"
    "      --transport NAME  read events from rabbitmq or redis (default: the events transport)\n"
    "  -n, --count COUNT     exit after COUNT events\n"
    "  -t, --timeout SECONDS exit after SECONDS with no event (exit status 4)\n"
    "  -h, --help            this help\n"
    "\n"
    "Options may come after PATTERN too.\n"
    "\n"
    "Exit status: 0 stopped by a signal or after COUNT events, 2 usage or configuration\n"
    "error (a bad URL, credentials or a TLS certificate a server refused, a server\n"
    "certificate that is not trusted or not for the host), 3 the broker could not be\n"
    "reached, 4 the timeout passed.\n";

int main(int argc, char **argv) {
    const char *path = "queues.conf", *transport = NULL;
    long count = -1;
    double timeout_s = 0;
    static const struct option opts[] = {{"config", required_argument, 0, 'c'}, {"transport", required_argument, 0, 'T'},
                                         {"count", required_argument, 0, 'n'},  {"timeout", required_argument, 0, 't'},
                                         {"help", no_argument, 0, 'h'},         {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "c:n:t:h", opts, NULL)) != -1) {
        switch (o) {
        case 'c': path = optarg; break;
        case 'T': transport = optarg; break;
        case 'n': count = atol(optarg); break;
        case 't': timeout_s = atof(optarg); break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (argc - optind > 1) {
        fprintf(stderr, "conveyor-subscribe: give at most one PATTERN\n%s", usage);
        return 2;
    }
    const char *pattern = optind < argc ? argv[optind] : "#";
    log_init("subscribe");
    struct cfg cfg;
    char err[1024];
    if (cfg_load(path, &cfg, err, sizeof err) < 0) {
        fprintf(stderr, "conveyor-subscribe: %s\n", err);
        return 2;
    }
    enum transport t = cfg.events_transport;
    if (transport && !transport_parse(transport, &t)) {
        fprintf(stderr, "conveyor-subscribe: --transport must be rabbitmq or redis\n");
        cfg_free(&cfg);
        return 2;
    }
    signals_stop_sets(&stop);
    signal(SIGPIPE, SIG_IGN);

    int cls;
    struct broker *b = broker_open_class(&cfg, t, &cls, err, sizeof err);
    if (!b || broker_subscribe(b, pattern) < 0) {
        fprintf(stderr, "conveyor-subscribe: %s\n", b ? broker_error(b) : err);
        broker_close(b);
        cfg_free(&cfg);
        return !b && cls == CV_ECONFIG ? 2 : 3;
    }
    int status = 0;
    int64_t idle_since = clock_mono_ms();
    for (long seen = 0; !stop && (count < 0 || seen < count);) {
        char *json = NULL;
        int rc = broker_next_event(b, &json, 250);
        if (rc < 0) {
            fprintf(stderr, "conveyor-subscribe: %s; resubscribing\n", broker_error(b));
            backoff_sleep(1000, &stop);
            broker_subscribe(b, pattern);
            continue;
        }
        if (rc == 0) {
            if (timeout_s > 0 && clock_mono_ms() - idle_since > timeout_s * 1000) { status = 4; break; }
            continue;
        }
        if (printf("%s\n", json) < 0 || fflush(stdout) != 0) { free(json); break; }
        free(json);
        seen++;
        idle_since = clock_mono_ms();
    }
    broker_close(b);
    cfg_free(&cfg);
    return status;
}
