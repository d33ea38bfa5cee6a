/* produce.c - conveyor-produce: publish commands from the command line or stdin. */
#include "conveyor.h"
#include "core.h" /* xstrndup, xmalloc, xrealloc, clock_mono_ms */

#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum {
    EXIT_REJECTED = 1, EXIT_USAGE = 2, EXIT_BROKER = 3, EXIT_TIMEOUT = 4, EXIT_INVALID = 5, EXIT_FULL = 6,
    EXIT_SPOOL = 7
};

static const char usage[] =
    "usage: conveyor-produce [-c FILE] [--wait] [--timeout SECONDS] [--correlation-id ID]\n"
    "                        [--traceparent VALUE] [--at TIME | --in DURATION] [--priority CLASS]\n"
    "                        [--fairness-key KEY] [--ordering-key KEY] TYPE PAYLOAD_JSON\n"
    "       conveyor-produce [-c FILE] [--wait] [--timeout SECONDS] [--at TIME | --in DURATION]\n"
    "                        [--priority CLASS] [--fairness-key KEY] [--ordering-key KEY] < commands.ndjson\n"
    "       conveyor-produce [-c FILE] --spool DIR --flush\n"
    "       conveyor-produce --spool DIR --status\n"
    "\n"
    "Publishes a command (TYPE and its payload object), or one command per line of\n"
    "standard input (a whole envelope, or {\"type\": ..., \"payload\": {...}}), routed by\n"
    "FILE, and prints each command id once the broker has confirmed it. Reading\n"
    "stdin with stderr on a terminal, it shows a progress line on stderr (count,\n"
    "rate, twice a second) and ends with a summary line, however short the run:\n"
    "'conveyor-produce: N published in S s'. Options may follow TYPE and PAYLOAD_JSON.\n"
    "\n"
    "  -c, --config FILE       configuration (default ./queues.conf)\n"
    "  -w, --wait              wait for each command's result event and print it\n"
    "  -t, --timeout SECONDS   how long --wait waits (default 30)\n"
    "      --correlation-id ID set the command's correlationId\n"
    "      --traceparent VALUE set the command's W3C traceparent (00-<trace-id>-<parent-id>-<flags>);\n"
    "                          on stdin, an envelope carries its own \"traceparent\"\n"
    "      --at TIME           run the command(s) not before TIME (RFC 3339 with an offset,\n"
    "                          2026-12-24T18:00:00+01:00): the envelope's notBefore; a line of\n"
    "                          stdin with its own notBefore keeps it\n"
    "      --in DURATION       ... not before DURATION from now by this host's clock (90s, 15m,\n"
    "                          2h, 7d; a number alone is seconds)\n"
    "      --priority CLASS    high, normal or low: the envelope's priority (a queue with lanes\n"
    "                          takes high first; README, \"Priorities, fairness and order\")\n"
    "      --fairness-key KEY  the envelope's fairnessKey: who the command is fair between\n"
    "      --ordering-key KEY  the envelope's orderingKey: the aggregate whose order it keeps\n"
    "                          (default: the payload's productId, userId or orderId);\n"
    "                          on stdin, a line with its own field keeps it\n"
    "      --spool DIR         the offline spool: a command the broker cannot take now (it cannot\n"
    "                          be reached) is appended to DIR/spool.log, fsync'd, and its id\n"
    "                          printed (exit 0); what waits there is sent first, in order, by\n"
    "                          this and every later run with DIR (one process per DIR: locked);\n"
    "                          bounded by producer.spool_max_bytes (default 64 MiB). Never\n"
    "                          spooled: an invalid command (5), a full queue (6)\n"
    "      --flush             with --spool: send what waits in DIR, in order, and exit (0: none\n"
    "                          is left; 3: the broker cannot be reached, the rest waits)\n"
    "      --status            with --spool: print what waits in DIR as one JSON line\n"
    "                          ({\"dir\", \"records\", \"bytes\", \"oldestCreatedAt\"}) and exit\n"
    "  -h, --help              this help\n"
    "\n"
    "Exit status: 0 published (with --wait: every result was a success event),\n"
    "1 a command was rejected (command.rejected), 2 usage or configuration error\n"
    "(a bad URL, credentials or a TLS certificate a server refused, a server\n"
    "certificate that is not trusted or not for the host), 3 the broker could not\n"
    "be reached or refused a message, 4 --wait timed out, 5 a command was invalid\n"
    "and was not sent, 6 a queue with max_length was full and refused a command\n"
    "(not queued; on stdin, the lines of that batch it refused are named, the\n"
    "others' ids printed, and no further line is read), 7 the spool (--spool) is\n"
    "full, locked by another process, corrupt or cannot be written (the message\n"
    "says which; the command was neither sent nor spooled).\n";

/* Flushes stdout; when its reader has gone (EPIPE: `| head -1`), ends the
 * process by SIGPIPE as it would without main's SIG_IGN (which is for the
 * broker's sockets, not for stdout). */
static void flush_stdout(void) {
    if ((fflush(stdout) == EOF || ferror(stdout)) && errno == EPIPE) {
        signal(SIGPIPE, SIG_DFL);
        raise(SIGPIPE);
    }
}

static int code_for(int rc) {
    switch (rc) {
    case CONVEYOR_EINVALID: return EXIT_INVALID;
    case CONVEYOR_EBROKER: return EXIT_BROKER;
    case CONVEYOR_ETIMEOUT: return EXIT_TIMEOUT;
    case CONVEYOR_REJECTED: return EXIT_REJECTED;
    case CONVEYOR_EFULL: return EXIT_FULL;
    case CONVEYOR_ESPOOL: return EXIT_SPOOL;
    default: return 0;
    }
}

/* Commands sent together at most (one window of confirms). */
#define BATCH_MAX 500

/* Lines of standard input, read straight from fd 0 so that "is another line
 * already waiting?" has an answer (poll cannot see stdio's buffer). */
struct line_reader {
    char *buf;
    size_t len, cap;
};

/* The next line (malloc'd, without its newline), or NULL when none is ready:
 * with block, waits for one (NULL then means end of input, *eof set);
 * without, returns only a line already read or readable now. */
static char *next_line(struct line_reader *r, bool block, bool *eof) {
    for (;;) {
        char *nl = r->len ? memchr(r->buf, '\n', r->len) : NULL;
        if (nl || (*eof && r->len)) {
            size_t n = nl ? (size_t)(nl - r->buf) : r->len;
            char *line = xstrndup(r->buf, n);
            size_t used = nl ? n + 1 : n;
            memmove(r->buf, r->buf + used, r->len - used);
            r->len -= used;
            if (n && line[n - 1] == '\r') line[n - 1] = '\0';
            return line;
        }
        if (*eof) return NULL;
        if (!block) {
            struct pollfd pfd = {0, POLLIN, 0};
            if (poll(&pfd, 1, 0) <= 0) return NULL;
        }
        if (r->cap - r->len < 65536) r->buf = xrealloc(r->buf, r->cap = r->cap * 2 + 65536);
        ssize_t got = read(0, r->buf + r->len, r->cap - r->len);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) *eof = true;
        else r->len += (size_t)got;
    }
}

/* Waits for id's result and prints it; returns an exit status. */
static int wait_result(conveyor_client *c, const char *id, int timeout_ms) {
    char *event = NULL;
    int rc = conveyor_wait(c, id, timeout_ms, &event);
    if (event) {
        printf("%s\n", event);
        flush_stdout();
        free(event);
    } else {
        fprintf(stderr, "conveyor-produce: %s\n", conveyor_error(c));
    }
    return code_for(rc);
}

/* The envelope fields the options give, by name, each NULL when not given. */
struct option_fields {
    const char *traceparent, *not_before, *priority, *fairness_key, *ordering_key;
};
static bool any_field(const struct option_fields *f) {
    return f->traceparent || f->not_before || f->priority || f->fairness_key || f->ordering_key;
}

/* Adds to the envelope o each field of f that is given and o lacks. */
static void add_fields(cJSON *o, const struct option_fields *f) {
    const char *names[] = {"traceparent", "notBefore", "priority", "fairnessKey", "orderingKey"};
    const char *values[] = {f->traceparent, f->not_before, f->priority, f->fairness_key, f->ordering_key};
    for (int i = 0; i < 5; i++)
        if (values[i] && !cJSON_GetObjectItemCaseSensitive(o, names[i])) cJSON_AddStringToObject(o, names[i], values[i]);
}

/* As conveyor_publish, with the envelope fields of f (traceparent checked by
 * the caller; the others by the client's envelope check): builds {type,
 * payload, correlationId?, and f's} and publishes it whole. Returns as
 * conveyor_publish (CONVEYOR_EINVALID: the payload is not a JSON object, or
 * a field is invalid, with the reason in conveyor_error). */
static int publish_built(conveyor_client *c, const char *type, const char *payload_json, const char *corr,
                         const struct option_fields *f, char id[37]) {
    cJSON *payload = cJSON_Parse(payload_json);
    if (!cJSON_IsObject(payload)) { /* as conveyor_publish says it */
        cJSON_Delete(payload);
        return conveyor_publish(c, type, payload_json, corr, id);
    }
    cJSON *env = cJSON_CreateObject();
    cJSON_AddStringToObject(env, "type", type);
    cJSON_AddItemToObject(env, "payload", payload);
    if (corr) cJSON_AddStringToObject(env, "correlationId", corr);
    add_fields(env, f);
    char *json = cJSON_PrintUnformatted(env);
    cJSON_Delete(env);
    if (!json) { /* as alloc.c does when memory cannot be had */
        log_error("out of memory");
        abort();
    }
    int rc = conveyor_publish_envelope(c, json, id);
    free(json);
    return rc;
}

/* A line of stdin with the fields of f (notBefore, priority, fairnessKey,
 * orderingKey) it lacks added, when it is an object (malloc'd; the caller
 * frees it and line); else line itself. */
static char *line_fields(char *line, const struct option_fields *f) {
    cJSON *o = any_field(f) ? cJSON_Parse(line) : NULL;
    char *out = line;
    if (cJSON_IsObject(o)) {
        add_fields(o, f);
        char *json = cJSON_PrintUnformatted(o);
        if (json) {
            free(line);
            out = json;
        }
    }
    cJSON_Delete(o);
    return out;
}

/* After CONVEYOR_EFULL (or CONVEYOR_ESPOOL) on a batch of stdin lines: names
 * the lines refused (neither sent nor invalid: what says how, "refused, not
 * queued"), runs of consecutive ones as a range, on stderr. */
static void report_refused(const long *lines, char (*ids)[37], const bool *invalid, int n, const char *what,
                           const char *why) {
    for (int i = 0; i < n; i++) {
        if (ids[i][0] || invalid[i]) continue;
        int j = i;
        while (j + 1 < n && !ids[j + 1][0] && !invalid[j + 1] && lines[j + 1] == lines[j] + 1) j++;
        if (j == i) fprintf(stderr, "conveyor-produce: stdin line %ld %s: %s\n", lines[i], what, why);
        else fprintf(stderr, "conveyor-produce: stdin lines %ld-%ld %s: %s\n", lines[i], lines[j], what, why);
        i = j;
    }
}

/* --at TIME or --in DURATION into out (RFC 3339); returns true, or false with why. */
static bool not_before_option(const char *at, const char *in, char out[40], const char **why) {
    int64_t ms, secs;
    if (at && in) *why = "give --at or --in, not both";
    else if (at && !clock_rfc3339_ms(at, &ms)) *why = "--at must be an RFC 3339 date-time with an offset "
                                                    "(2026-12-24T18:00:00+01:00 or ...Z)";
    else if (in && (!duration_parse(in, &secs) || secs < 0 || secs > 100LL * 366 * 86400))
        *why = "--in must be a duration of at most 100 years: 90s, 15m, 2h, 7d";
    else {
        if (at) snprintf(out, 40, "%s", at);
        else if (in) clock_rfc3339(clock_ms() + secs * 1000, out);
        return true;
    }
    return false;
}

/* --spool DIR --status: prints what waits in dir as one JSON line. Returns an exit status. */
static int spool_status(const char *dir) {
    long long records = 0, bytes = 0;
    char oldest[40], err[1024];
    if (conveyor_spool_status(dir, &records, &bytes, oldest, err, sizeof err) < 0) {
        fprintf(stderr, "conveyor-produce: %s\n", err);
        return EXIT_SPOOL;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "dir", dir);
    cJSON_AddNumberToObject(o, "records", (double)records);
    cJSON_AddNumberToObject(o, "bytes", (double)bytes);
    json_add_optional(o, "oldestCreatedAt", oldest[0] ? oldest : NULL);
    char *json = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!json) { /* as alloc.c does when memory cannot be had */
        log_error("out of memory");
        abort();
    }
    printf("%s\n", json);
    free(json);
    return 0;
}

/* --spool DIR: gives c its spool, and sends what waits there (with --flush,
 * only that). Returns 0 to go on publishing, or an exit status: the spool
 * cannot be used; with flush, how the sending ended. */
static int open_spool(conveyor_client *c, const char *dir, bool flush) {
    int rc = conveyor_set_spool(c, dir, 0);
    if (rc < 0) {
        fprintf(stderr, "conveyor-produce: %s\n", conveyor_error(c));
        return EXIT_SPOOL;
    }
    if (!flush && conveyor_spooled(c) == 0) return 0;
    rc = conveyor_flush(c);
    if (rc >= 0) {
        if (flush) fprintf(stderr, "conveyor-produce: %d spooled commands sent from %s; none waits\n", rc, dir);
        return 0;
    }
    fprintf(stderr, "conveyor-produce: waiting in the spool %s: %lld; not sent now: %s\n", dir, conveyor_spooled(c),
            conveyor_error(c));
    if (!flush) return 0; /* the publishes go behind them, and say what fails */
    return rc == CONVEYOR_EBROKER && conveyor_config_error(c) ? EXIT_USAGE : code_for(rc);
}

/* Long on purpose: the option table, its checks and the one loop over the
 * commands, in the order a reader of --help meets them. */
int main(int argc, char **argv) {
    const char *path = "queues.conf", *corr = NULL, *traceparent = NULL, *at = NULL, *in = NULL, *spool = NULL;
    struct option_fields fields = {0};
    bool wait = false, flush = false, status_only = false;
    double timeout_s = 30;
    static const struct option opts[] = {
        {"config", required_argument, 0, 'c'}, {"wait", no_argument, 0, 'w'},
        {"timeout", required_argument, 0, 't'}, {"correlation-id", required_argument, 0, 'r'},
        {"traceparent", required_argument, 0, 'p'}, {"at", required_argument, 0, 'a'},
        {"in", required_argument, 0, 'i'}, {"priority", required_argument, 0, 'P'},
        {"fairness-key", required_argument, 0, 'f'}, {"ordering-key", required_argument, 0, 'o'},
        {"spool", required_argument, 0, 'S'}, {"flush", no_argument, 0, 'F'}, {"status", no_argument, 0, 'T'},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    /* hiredis writes without MSG_NOSIGNAL: a reset Redis connection must fail the
     * write (EPIPE: a lost broker, spooled or retried), not kill the process */
    signal(SIGPIPE, SIG_IGN);
    int o;
    while ((o = getopt_long(argc, argv, "c:wt:h", opts, NULL)) != -1) {
        switch (o) {
        case 'c': path = optarg; break;
        case 'w': wait = true; break;
        case 't': timeout_s = atof(optarg); break;
        case 'r': corr = optarg; break;
        case 'p': traceparent = optarg; break;
        case 'a': at = optarg; break;
        case 'i': in = optarg; break;
        case 'P': fields.priority = optarg; break;
        case 'f': fields.fairness_key = optarg; break;
        case 'o': fields.ordering_key = optarg; break;
        case 'S': spool = optarg; break;
        case 'F': flush = true; break;
        case 'T': status_only = true; break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs(usage, stderr); return EXIT_USAGE;
        }
    }
    int nargs = argc - optind;
    if (nargs != 0 && nargs != 2) {
        fprintf(stderr, "conveyor-produce: give TYPE and PAYLOAD_JSON, or commands on stdin\n%s", usage);
        return EXIT_USAGE;
    }
    if ((flush || status_only) && (!spool || nargs != 0 || (flush && status_only))) {
        fprintf(stderr, "conveyor-produce: --flush and --status go with --spool DIR, alone (no command, not both)\n");
        return EXIT_USAGE;
    }
    if (status_only) return spool_status(spool);
    struct trace trace;
    const char *why;
    if (traceparent && (nargs != 2 || !trace_parse(traceparent, &trace, &why))) {
        fprintf(stderr, "conveyor-produce: --traceparent %s\n",
                nargs != 2 ? "goes with TYPE and PAYLOAD_JSON (on stdin, put it in the envelope)" : why);
        return EXIT_USAGE;
    }
    char not_before_text[40] = "";
    if ((at || in) && !not_before_option(at, in, not_before_text, &why)) {
        fprintf(stderr, "conveyor-produce: %s\n", why);
        return EXIT_USAGE;
    }
    int cls;
    if (fields.priority && !lane_class_parse(fields.priority, &cls)) {
        fprintf(stderr, "conveyor-produce: --priority must be high, normal or low (got '%s')\n", fields.priority);
        return EXIT_USAGE;
    }
    fields.not_before = not_before_text[0] ? not_before_text : NULL;
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
    if (spool) {
        int rc = open_spool(c, spool, flush);
        if (flush || rc) {
            conveyor_close(c);
            return rc;
        }
    }
    int timeout_ms = (int)(timeout_s * 1000);
    int status = 0;
    if (nargs == 2) {
        fields.traceparent = traceparent;
        int rc = any_field(&fields) ? publish_built(c, argv[optind], argv[optind + 1], corr, &fields, id)
                     : conveyor_publish(c, argv[optind], argv[optind + 1], corr, id);
        if (rc < 0) {
            fprintf(stderr, "conveyor-produce: %s\n", conveyor_error(c));
            status = rc == CONVEYOR_EBROKER && conveyor_config_error(c) ? EXIT_USAGE : code_for(rc);
        } else {
            printf("%s\n", id);
            flush_stdout();
            if (conveyor_spooled(c) > 0) fprintf(stderr, "conveyor-produce: %s\n", conveyor_error(c));
            if (wait) status = wait_result(c, id, timeout_ms);
        }
        conveyor_close(c);
        return status;
    }

    /* stdin: one command per line; bad lines are reported and skipped. Lines
     * already waiting are sent together (up to BATCH_MAX, one wait for the
     * broker); a line typed alone is sent at once. */
    struct line_reader lr = {0};
    char *batch[BATCH_MAX], *errors[BATCH_MAX];
    char (*bids)[37] = xmalloc(BATCH_MAX * sizeof *bids);
    long lines[BATCH_MAX], lineno = 0;
    char (*ids)[37] = NULL;
    size_t nids = 0, idcap = 0;
    bool eof = false;
    /* on a terminal, a progress line on stderr (count and rate), twice a second */
    bool progress = isatty(STDERR_FILENO), spool_told = false;
    long published = 0;
    int64_t started = clock_mono_ms(), shown = started;
    while (status != EXIT_BROKER && status != EXIT_FULL && status != EXIT_SPOOL) {
        int n = 0;
        char *l;
        while (n < BATCH_MAX && (l = next_line(&lr, n == 0, &eof))) {
            lineno++;
            if (!*l) { free(l); continue; }
            lines[n] = lineno;
            batch[n++] = line_fields(l, &fields);
        }
        if (n == 0) {
            if (eof) break;
            continue;
        }
        int rc = conveyor_publish_batch(c, (const char *const *)batch, n, bids, errors);
        bool errors_seen[BATCH_MAX];
        for (int i = 0; i < n; i++) {
            errors_seen[i] = errors[i] != NULL;
            if (errors[i]) {
                fprintf(stderr, "conveyor-produce: stdin line %ld not sent: %s\n", lines[i], errors[i]);
                status = EXIT_INVALID;
            } else if (bids[i][0]) {
                printf("%s\n", bids[i]);
                published++;
                if (wait) {
                    if (nids == idcap) ids = xrealloc(ids, (idcap = idcap ? idcap * 2 : 64) * sizeof *ids);
                    memcpy(ids[nids++], bids[i], 37);
                }
            }
            free(errors[i]);
            free(batch[i]);
        }
        if (rc == CONVEYOR_EFULL || rc == CONVEYOR_ESPOOL) { /* refused, not queued: say which lines, read no more */
            report_refused(lines, bids, errors_seen, n,
                           rc == CONVEYOR_EFULL ? "refused, not queued" : "neither sent nor spooled", conveyor_error(c));
            status = code_for(rc);
        } else if (rc < 0) {
            fprintf(stderr, "conveyor-produce: stdin lines %ld-%ld not sent: %s\n", lines[0], lines[n - 1],
                    conveyor_error(c));
            status = EXIT_BROKER;
            if (conveyor_config_error(c)) { /* it would be refused again: stop as for any configuration error */
                status = EXIT_USAGE;
                break;
            }
        }
        if (spool && !spool_told && rc == 0 && conveyor_spooled(c) > 0) { /* once: why commands go to the spool */
            fprintf(stderr, "conveyor-produce: %s\n", conveyor_error(c));
            spool_told = true;
        }
        flush_stdout();
        int64_t now = clock_mono_ms();
        if (progress && now - shown >= 500) {
            fprintf(stderr, "\rconveyor-produce: %ld published, %.0f/s ", published,
                    (double)published * 1000.0 / (double)(now - started + 1));
            shown = now;
        }
    }
    if (progress) /* the summary, however short the run: the final count, and the line ends */
        fprintf(stderr, "\rconveyor-produce: %ld published in %.1f s\n", published,
                (double)(clock_mono_ms() - started) / 1000.0);
    free(bids);
    free(lr.buf);
    flush_stdout();
    for (size_t i = 0; i < nids; i++) {
        int s = wait_result(c, ids[i], timeout_ms);
        if (s && (!status || s == EXIT_TIMEOUT)) status = s;
    }
    free(ids);
    if (conveyor_spooled(c) > 0)
        fprintf(stderr, "conveyor-produce: waiting in the spool %s: %lld (sent by the next run with it, or "
                "--flush)\n", spool, conveyor_spooled(c));
    conveyor_close(c);
    return status;
}
