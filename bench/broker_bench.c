/* broker_bench.c - conveyor-bench-broker: the brokers alone, no database.
 *
 * Publishes N small commands to one queue through Conveyor's broker layer
 * (RabbitMQ: persistent, mandatory, publisher confirms in windows of WINDOW;
 * Redis: pipelined LPUSH) while a consumer process takes them as a worker does
 * (RabbitMQ: prefetch, one basic.ack each; Redis: BLMOVE into an in-flight list,
 * LREM each). Prints one JSON object: messages, seconds from the first publish
 * to the last ack, messages per second.
 *
 *   conveyor-bench-broker -c bench.conf -q bench -n 100000
 */
#include "core.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define WINDOW 500

volatile sig_atomic_t stop_requested;

/* The consumer: takes n messages, acks each; writes its finish time (monotonic ms) to fd. */
static int consume(const struct cfg *cfg, const struct cfg_queue *q, long n, int fd) {
    char err[512];
    struct broker *b = broker_open(cfg, q->transport, err, sizeof err);
    if (!b || broker_consume(b, q, "bench-consumer") < 0) {
        fprintf(stderr, "conveyor-bench-broker: consumer: %s\n", b ? broker_error(b) : err);
        return 1;
    }
    long got = 0;
    while (got < n) {
        struct delivery d;
        int rc = broker_next(b, &d, 1000);
        if (rc < 0) {
            fprintf(stderr, "conveyor-bench-broker: consumer: %s\n", broker_error(b));
            return 1;
        }
        if (rc == 0) continue;
        if (broker_ack(b, &d) < 0) {
            fprintf(stderr, "conveyor-bench-broker: ack: %s\n", broker_error(b));
            return 1;
        }
        delivery_free(&d);
        got++;
    }
    int64_t end = clock_mono_ms();
    if (write(fd, &end, sizeof end) != sizeof end) return 1;
    broker_close(b);
    return 0;
}

int main(int argc, char **argv) {
    const char *path = "queues.conf", *qname = NULL;
    long n = 100000;
    static const struct option opts[] = {{"config", required_argument, 0, 'c'}, {"queue", required_argument, 0, 'q'},
                                         {"count", required_argument, 0, 'n'}, {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int o;
    while ((o = getopt_long(argc, argv, "c:q:n:h", opts, NULL)) != -1) {
        if (o == 'c') path = optarg;
        else if (o == 'q') qname = optarg;
        else if (o == 'n') n = atol(optarg);
        else {
            printf("usage: conveyor-bench-broker -c FILE -q QUEUE [-n COUNT]\n\n"
                   "Publishes COUNT commands to QUEUE with confirms while a consumer acks them;\n"
                   "prints {transport, messages, seconds, perSecond} as JSON. The queue must be\n"
                   "empty and no worker may consume it. Exit 0, 1 on a broker error, 2 usage.\n");
            return o == 'h' ? 0 : 2;
        }
    }
    struct cfg cfg;
    char err[512];
    if (!qname || n <= 0) {
        fprintf(stderr, "conveyor-bench-broker: -q QUEUE and a positive -n are required\n");
        return 2;
    }
    if (cfg_load(path, &cfg, err, sizeof err) < 0) {
        fprintf(stderr, "conveyor-bench-broker: %s\n", err);
        return 2;
    }
    log_init("bench");
    const struct cfg_queue *q = cfg_queue_named(&cfg, qname);
    if (!q || q->ncommands < 1) {
        fprintf(stderr, "conveyor-bench-broker: no queue '%s' in %s\n", qname, path);
        return 2;
    }
    struct broker *b = broker_open(&cfg, q->transport, err, sizeof err);
    if (!b || broker_declare(b) < 0) {
        fprintf(stderr, "conveyor-bench-broker: %s\n", b ? broker_error(b) : err);
        return 1;
    }
    int fds[2];
    if (pipe(fds) < 0) return 1;
    pid_t pid = fork();
    if (pid < 0) return 1; /* else kill(-1) and waitpid(-1) below would reach every process */
    if (pid == 0) {
        close(fds[0]);
        _exit(consume(&cfg, q, n, fds[1]));
    }
    close(fds[1]);
    sleep(1); /* the consumer is connected before the clock starts */

    /* bodies shaped like a real command, ids fresh per message */
    char (*bodies)[256] = xmalloc(WINDOW * sizeof *bodies), (*ids)[ID_LEN + 1] = xmalloc(WINDOW * sizeof *ids);
    struct outgoing_command oc[WINDOW];
    int64_t t0 = clock_mono_ms();
    int rc = 0;
    for (long sent = 0; sent < n && rc == 0;) {
        int k = n - sent < WINDOW ? (int)(n - sent) : WINDOW;
        for (int i = 0; i < k; i++) {
            id_new(ids[i]);
            int len = snprintf(bodies[i], sizeof bodies[i],
                               "{\"id\":\"%s\",\"type\":\"%s\",\"payload\":{\"productId\":"
                               "\"00000000-0000-4000-8000-000000000001\",\"quantityChange\":1}}",
                               ids[i], q->commands[0]);
            oc[i] = (struct outgoing_command){q, q->commands[0], bodies[i], (size_t)len, ids[i], NULL};
        }
        if ((rc = broker_publish_commands(b, oc, k)) < 0)
            fprintf(stderr, "conveyor-bench-broker: publish: %s\n", broker_error(b));
        sent += k;
    }
    int64_t published = clock_mono_ms(), end = 0;
    int status = 1;
    if (rc == 0 && read(fds[0], &end, sizeof end) == sizeof end) status = 0;
    if (rc < 0) kill(pid, SIGTERM);
    (void)waitpid(pid, NULL, 0); /* reaps the consumer; its result came through the pipe */
    if (status == 0)
        printf("{\"transport\": \"%s\", \"messages\": %ld, \"publishSeconds\": %.3f, \"seconds\": %.3f, "
               "\"perSecond\": %.0f}\n",
               transport_name(q->transport), n, (published - t0) / 1000.0, (end - t0) / 1000.0,
               n * 1000.0 / (double)(end - t0 > 0 ? end - t0 : 1));
    free(bodies);
    free(ids);
    broker_close(b);
    cfg_free(&cfg);
    return status;
}
