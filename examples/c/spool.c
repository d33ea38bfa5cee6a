/*
 * spool.c - publish with an offline spool (Conveyor's C client, conveyor.h).
 *
 * Publishes N createProduct commands with a spool in DIR: when the broker
 * cannot be reached, each command is appended to DIR/spool.log (fsync'd) and
 * conveyor_publish still returns 0 with its id. Then it sends what waits
 * (conveyor_flush) and prints what is left (conveyor_spool_status).
 *
 *   cc spool.c $(pkg-config --cflags --libs conveyor) -o spool
 *   ./spool queues.conf /var/lib/myapp/conveyor-spool 10
 *
 * Prints "published N (S spooled)", then "flushed K" or "flush: <why>", then
 * "waiting R records, B bytes, oldest T". Exits 0 when every command was
 * published or spooled (whether or not the flush could send them), 1 when one
 * could not be (an invalid command, a full queue, a full spool), 2 on a bad
 * usage or configuration. It uses the public header only.
 */
#include <conveyor.h>

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    if (argc != 4 || atoi(argv[3]) < 1) {
        fprintf(stderr, "usage: %s CONFIG SPOOL_DIR N\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[3]), code = 0;
    char err[512], id[37];
    conveyor_client *c = conveyor_open(argv[1], 0, err, sizeof err, &code);
    if (!c) {
        fprintf(stderr, "cannot open the client: %s\n", err);
        return 2;
    }
    /* after conveyor_open: locks DIR, checks it (an append a crash cut short is cut off, kept aside) */
    if (conveyor_set_spool(c, argv[2], 0) != CONVEYOR_OK) {
        fprintf(stderr, "cannot use the spool: %s\n", conveyor_error(c));
        conveyor_close(c);
        return 2;
    }
    int published = 0;
    long long spooled = 0;
    for (int i = 0; i < n; i++) {
        char payload[128];
        snprintf(payload, sizeof payload, "{\"name\":\"spooled mug %d\",\"price\":\"3.50\",\"stock\":%d}", i, 10 + i);
        int rc = conveyor_publish(c, "createProduct", payload, NULL, id);
        if (rc != CONVEYOR_OK) { /* CONVEYOR_EINVALID, CONVEYOR_EFULL, CONVEYOR_ESPOOL, a refusal: not spooled */
            fprintf(stderr, "command %d not published: %s\n", i, conveyor_error(c));
            break;
        }
        published++;
        /* anything waiting in the spool after a success: this command waits there too */
        if (conveyor_spooled(c) > 0) spooled++;
        printf("%s\n", id);
    }
    printf("published %d (%lld spooled)\n", published, spooled);
    int sent = conveyor_flush(c); /* sends what waits, in order; nothing runs in the background */
    if (sent >= 0) printf("flushed %d\n", sent);
    else printf("flush: %s\n", conveyor_error(c));
    long long records = 0, bytes = 0;
    char oldest[40];
    if (conveyor_spool_status(argv[2], &records, &bytes, oldest, err, sizeof err) == CONVEYOR_OK)
        printf("waiting %lld records, %lld bytes, oldest %s\n", records, bytes, oldest[0] ? oldest : "-");
    else fprintf(stderr, "status: %s\n", err);
    conveyor_close(c);
    return published == n ? 0 : 1;
}
