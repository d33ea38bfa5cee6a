/*
 * publish.c - publish one Conveyor command with libconveyor and print its result event.
 *
 *   publish [-c FILE] [-t SECONDS] TYPE PAYLOAD_JSON
 *   publish -c queues.conf createProduct '{"name":"Mug","price":"3.50","stock":20}'
 *
 * A program of your own, built against the installed library alone (it includes
 * conveyor.h and nothing else of Conveyor):
 *
 *   cc -o publish publish.c $(pkg-config --cflags --libs conveyor)
 *   make                                     (the Makefile here: every *.c)
 *   cmake -S . -B build && cmake --build build     (CMakeLists.txt here: find_package(Conveyor))
 *
 * It opens a client that subscribes to the result events (CONVEYOR_WAIT),
 * publishes the command (the broker confirms it), waits for its result and
 * prints that event, one JSON line on stdout; the command id goes to stderr.
 * The configuration is FILE (default ./queues.conf) and the CONVEYOR_*
 * environment, as for conveyor-produce.
 *
 * Exit status, as conveyor-produce's: 0 the result is a success event, 1 the
 * command was rejected (command.rejected printed), 2 usage or configuration
 * error (a bad file or URL, credentials or a TLS certificate a server refused),
 * 3 the broker could not be reached or refused the message, 4 no result in
 * time, 5 the command is invalid and was not sent, 6 its queue is full (not
 * queued).
 */
#include <conveyor.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char usage[] =
    "usage: publish [-c FILE] [-t SECONDS] TYPE PAYLOAD_JSON\n"
    "\n"
    "Publishes one command with libconveyor, waits for its result event and prints\n"
    "it (one JSON line); the command id goes to stderr.\n"
    "\n"
    "  -c FILE      configuration (default ./queues.conf; CONVEYOR_* override it)\n"
    "  -t SECONDS   how long to wait for the result (default 30)\n"
    "  -h, --help   this help\n"
    "\n"
    "Exit status: 0 a success event, 1 the command was rejected, 2 usage or\n"
    "configuration error (a bad URL, credentials or a TLS certificate a server\n"
    "refused), 3 the broker could not be reached or refused the message, 4 no\n"
    "result in time, 5 the command is invalid and was not sent, 6 its queue is\n"
    "full (not queued).\n";

/* The exit status (conveyor-produce's) for a conveyor_publish or conveyor_wait result on client c. */
static int exit_status(conveyor_client *c, int rc) {
    switch (rc) {
    case CONVEYOR_OK: return 0;
    case CONVEYOR_REJECTED: return 1;
    case CONVEYOR_ETIMEOUT: return 4;
    case CONVEYOR_EINVALID: return 5;
    case CONVEYOR_EFULL: return 6;
    case CONVEYOR_EBROKER: return conveyor_config_error(c) ? 2 : 3; /* a refused configuration: 2 */
    default: return 3;
    }
}

int main(int argc, char **argv) {
    const char *config = "queues.conf", *type = NULL, *payload = NULL;
    long timeout_s = 30;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            fputs(usage, stdout);
            return 0;
        } else if (!strcmp(argv[i], "-c") && i + 1 < argc) {
            config = argv[++i];
        } else if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            char *end;
            timeout_s = strtol(argv[++i], &end, 10);
            if (*end || timeout_s <= 0 || timeout_s > 86400) {
                fprintf(stderr, "publish: -t wants whole seconds from 1 to 86400, not '%s'\n", argv[i]);
                return 2;
            }
        } else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "publish: unknown option or missing value: %s\n%s", argv[i], usage);
            return 2;
        } else if (!type) {
            type = argv[i];
        } else if (!payload) {
            payload = argv[i];
        } else {
            fprintf(stderr, "publish: one command at a time (extra argument '%s')\n%s", argv[i], usage);
            return 2;
        }
    }
    if (!type || !payload) {
        fprintf(stderr, "publish: TYPE and PAYLOAD_JSON are needed\n%s", usage);
        return 2;
    }

    char err[512];
    int code = 0;
    conveyor_client *c = conveyor_open(config, CONVEYOR_WAIT, err, sizeof err, &code);
    if (!c) {
        fprintf(stderr, "publish: %s\n", err);
        return code == CONVEYOR_EBROKER ? 3 : 2;  /* unreachable : configuration */
    }

    char id[37];
    int rc = conveyor_publish(c, type, payload, NULL, id);
    if (rc != CONVEYOR_OK) {
        fprintf(stderr, "publish: %s\n", conveyor_error(c));
        int status = exit_status(c, rc);
        conveyor_close(c);
        return status;
    }
    fprintf(stderr, "publish: command %s published\n", id);

    char *event = NULL;
    rc = conveyor_wait(c, id, (int)(timeout_s * 1000), &event);
    if (event) {
        printf("%s\n", event);   /* a success event, or command.rejected */
        free(event);
    } else {
        fprintf(stderr, "publish: %s\n", conveyor_error(c));   /* no result in time */
    }
    int status = exit_status(c, rc);
    conveyor_close(c);
    return status;
}
