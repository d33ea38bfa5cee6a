/* produce.c - conveyor-produce: publish commands from the command line or stdin. */
#include "conveyor.h"

#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { EXIT_REJECTED = 1, EXIT_USAGE = 2, EXIT_BROKER = 3, EXIT_TIMEOUT = 4, EXIT_INVALID = 5 };

static const char usage[] =
    "usage: conveyor-produce [-c FILE] [--wait] [--timeout SECONDS] [--correlation-id ID] TYPE PAYLOAD_JSON\n"
    "       conveyor-produce [-c FILE] [--wait] [--timeout SECONDS] < commands.ndjson\n"
    "\n"
    "Publishes a command (TYPE and its payload object), or one command per line of\n"
    "standard input (a whole envelope, or {\"type\": ..., \"payload\": {...}}), routed by\n"
    "FILE, and prints each command id once the broker has confirmed it.\n"
    "\n"
    "  -c, --config FILE       configuration (default ./queues.conf)\n"
    "  -w, --wait              wait for each command's result event and print it\n"
    "  -t, --timeout SECONDS   how long --wait waits (default 30)\n"
    "      --correlation-id ID set the command's correlationId\n"
    "  -h, --help              this help\n"
    "\n"
    "Exit status: 0 published (with --wait: every result was a success event),\n"
    "1 a command was rejected (command.rejected), 2 usage or configuration error,\n"
    "3 the broker could not be reached or refused a message, 4 --wait timed out,\n"
    "5 a command was invalid and was not sent.\n";

static int code_for(int rc) {
    switch (rc) {
    case CONVEYOR_EINVALID: return EXIT_INVALID;
    case CONVEYOR_EBROKER: return EXIT_BROKER;
    case CONVEYOR_ETIMEOUT: return EXIT_TIMEOUT;
    case CONVEYOR_REJECTED: return EXIT_REJECTED;
    default: return 0;
    }
}

/* Waits for id's result and prints it; returns an exit status. */
static int wait_result(conveyor_client *c, const char *id, int timeout_ms) {
    char *event = NULL;
    int rc = conveyor_wait(c, id, timeout_ms, &event);
    if (event) {
        printf("%s\n", event);
        fflush(stdout);
        free(event);
    } else {
        fprintf(stderr, "conveyor-produce: %s\n", conveyor_error(c));
    }
    return code_for(rc);
}

int main(int argc, char **argv) {
    const char *path = "queues.conf", *corr = NULL;
    bool wait = false;
    double timeout_s = 30;
    static const struct option opts[] = {
        {"config", required_argument, 0, 'c'}, {"wait", no_argument, 0, 'w'},
        {"timeout", required_argument, 0, 't'}, {"correlation-id", required_argument, 0, 'r'},
        {"help", no_argument, 0, 'h'},          {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "c:wt:h", opts, NULL)) != -1) {
        switch (o) {
        case 'c': path = optarg; break;
        case 'w': wait = true; break;
        case 't': timeout_s = atof(optarg); break;
        case 'r': corr = optarg; break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return EXIT_USAGE;
        }
    }
    int nargs = argc - optind;
    if (nargs != 0 && nargs != 2) {
        fprintf(stderr, "conveyor-produce: give TYPE and PAYLOAD_JSON, or commands on stdin\n%s", usage);
        return EXIT_USAGE;
    }
    if (timeout_s <= 0) {
        fprintf(stderr, "conveyor-produce: --timeout must be a positive number of seconds\n");
        return EXIT_USAGE;
    }
    char err[1024], id[37];
    int open_rc;
    conveyor_client *c = conveyor_open(path, wait ? CONVEYOR_WAIT : 0, err, sizeof err, &open_rc);
    if (!c) {
        fprintf(stderr, "conveyor-produce: %s\n", err);
        return open_rc == CONVEYOR_EBROKER ? EXIT_BROKER : EXIT_USAGE;
    }
    int timeout_ms = (int)(timeout_s * 1000);
    int status = 0;
    if (nargs == 2) {
        int rc = conveyor_publish(c, argv[optind], argv[optind + 1], corr, id);
        if (rc < 0) {
            fprintf(stderr, "conveyor-produce: %s\n", conveyor_error(c));
            status = code_for(rc);
        } else {
            printf("%s\n", id);
            fflush(stdout);
            if (wait) status = wait_result(c, id, timeout_ms);
        }
        conveyor_close(c);
        return status;
    }

    /* stdin: one command per line; bad lines are reported and skipped */
    char *line = NULL, (*ids)[37] = NULL;
    size_t cap = 0, nids = 0, idcap = 0;
    long lineno = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        lineno++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
        if (len == 0) continue;
        int rc = conveyor_publish_envelope(c, line, id);
        if (rc == CONVEYOR_EINVALID) {
            fprintf(stderr, "conveyor-produce: stdin line %ld not sent: %s\n", lineno, conveyor_error(c));
            status = EXIT_INVALID;
            continue;
        }
        if (rc < 0) {
            fprintf(stderr, "conveyor-produce: stdin line %ld not sent: %s\n", lineno, conveyor_error(c));
            status = EXIT_BROKER;
            break;
        }
        printf("%s\n", id);
        if (wait) {
            if (nids == idcap) ids = realloc(ids, (idcap = idcap ? idcap * 2 : 64) * sizeof *ids);
            memcpy(ids[nids++], id, 37);
        }
    }
    fflush(stdout);
    free(line);
    for (size_t i = 0; i < nids; i++) {
        int s = wait_result(c, ids[i], timeout_ms);
        if (s && (!status || s == EXIT_TIMEOUT)) status = s;
    }
    free(ids);
    conveyor_close(c);
    return status;
}
