/* subscribe.c - conveyor-subscribe: print events as NDJSON, filtered by type;
 * with --name, a durable subscription (docs/contract.md section 13) whose
 * events are printed, run through a command (--exec), or answered by the
 * reader (--acks). The durable modes are durable_subscription.c's. */
#include "core.h"
#include "durable.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile sig_atomic_t stop;

static const char usage[] =
    "usage: conveyor-subscribe [-c FILE] [--transport rabbitmq|redis] [-n COUNT] [--timeout SECONDS] [PATTERN]\n"
    "       conveyor-subscribe [-c FILE] --name NAME [--from WHERE] [--partitions N] [--exec CMD | --acks]\n"
    "                          [--max-attempts N] [--retry-base-ms MS] [-n COUNT] [--timeout SECONDS] [PATTERN...]\n"
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
    "With --name, a durable subscription (README, \"Subscribing\"): created at its first use with\n"
    "the PATTERNs (default '#'), it keeps every matching event published from then on until\n"
    "one of its processes has handled it; processes with the same name share the work, and\n"
    "events of one aggregate come in commit order.\n"
    "      --name NAME        the subscription (1-64 of A-Z a-z 0-9 _ -)\n"
    "      --from WHERE       at creation: newest (default), oldest, an RFC 3339 time, an event id\n"
    "      --partitions N     at creation: 1-64 (default 4)\n"
    "      --exec CMD         run '/bin/sh -c CMD' per event, the event on its stdin (env\n"
    "                         CONVEYOR_SUBSCRIPTION, CONVEYOR_EVENT_ID, CONVEYOR_EVENT_TYPE,\n"
    "                         CONVEYOR_ATTEMPT): exit 0 acknowledges, anything else retries\n"
    "      --exec-timeout S   a CMD running longer is killed: a failure (default 60)\n"
    "      --acks             print each event and wait for 'ack ID' or 'nack ID [REASON]' lines\n"
    "                         on stdin; up to --window N (default 100) are out at once\n"
    "      --max-attempts N   failures before the event goes to the dead letters (default 5)\n"
    "      --retry-base-ms MS the first retry's delay, doubled per attempt up to 60 s (default 1000)\n"
    "Without --exec or --acks each event is printed and acknowledged once written.\n"
    "\n"
    "Options may come after PATTERN too.\n"
    "\n"
    "Exit status: 0 stopped by a signal or after COUNT events, 2 usage or configuration\n"
    "error (a bad URL, credentials or a TLS certificate a server refused, a server\n"
    "certificate that is not trusted or not for the host; with --name also a subscription\n"
    "that exists with other patterns, partitions or --from), 3 the broker (or, with --name,\n"
    "Conveyor's database) could not be reached, 4 the timeout passed.\n";

/* Parses s as an integer from lo to hi into *out: true, or false. */
static bool int_arg(const char *s, long lo, long hi, int *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi) return false;
    *out = (int)v;
    return true;
}

static int bad_arg(const char *opt, const char *range) {
    fprintf(stderr, "conveyor-subscribe: %s must be %s\n", opt, range);
    return 2;
}

int main(int argc, char **argv) {
    const char *path = "queues.conf", *transport = NULL;
    long count = -1;
    double timeout_s = 0;
    struct durable_options d = {.window = 100, .exec_timeout_s = 60};
    static const struct option opts[] = {{"config", required_argument, 0, 'c'},
                                         {"transport", required_argument, 0, 'T'},
                                         {"count", required_argument, 0, 'n'},
                                         {"timeout", required_argument, 0, 't'},
                                         {"name", required_argument, 0, 'N'},
                                         {"from", required_argument, 0, 'F'},
                                         {"partitions", required_argument, 0, 'P'},
                                         {"exec", required_argument, 0, 'E'},
                                         {"exec-timeout", required_argument, 0, 'X'},
                                         {"acks", no_argument, 0, 'A'},
                                         {"window", required_argument, 0, 'W'},
                                         {"max-attempts", required_argument, 0, 'M'},
                                         {"retry-base-ms", required_argument, 0, 'R'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "c:n:t:h", opts, NULL)) != -1) {
        switch (o) {
        case 'c': path = optarg; break;
        case 'T': transport = optarg; break;
        case 'n': count = atol(optarg); break;
        case 't': timeout_s = atof(optarg); break;
        case 'N': d.name = optarg; break;
        case 'F': d.from = optarg; break;
        case 'P': if (!int_arg(optarg, 1, 64, &d.partitions)) return bad_arg("--partitions", "1 to 64"); break;
        case 'E': d.exec = optarg; break;
        case 'X': if (!int_arg(optarg, 1, 86400, &d.exec_timeout_s)) return bad_arg("--exec-timeout", "1 to 86400 seconds"); break;
        case 'A': d.acks = true; break;
        case 'W': if (!int_arg(optarg, 1, 10000, &d.window)) return bad_arg("--window", "1 to 10000"); break;
        case 'M': if (!int_arg(optarg, 1, 1000, &d.max_attempts)) return bad_arg("--max-attempts", "1 to 1000"); break;
        case 'R': if (!int_arg(optarg, 1, 3600000, &d.retry_base_ms)) return bad_arg("--retry-base-ms", "1 to 3600000"); break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (d.name) {
        if (d.exec && d.acks) {
            fprintf(stderr, "conveyor-subscribe: give --exec or --acks, not both\n");
            return 2;
        }
        d.config = path;
        d.transport = transport;
        d.count = count;
        d.timeout_s = timeout_s;
        d.patterns = (const char *const *)argv + optind;
        d.npatterns = argc - optind;
        log_init("subscribe");
        return durable_run(&d);
    }
    if (d.from || d.partitions || d.exec || d.acks || d.max_attempts || d.retry_base_ms) {
        fprintf(stderr, "conveyor-subscribe: --from, --partitions, --exec, --acks, --max-attempts and "
                        "--retry-base-ms need --name\n");
        return 2;
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
