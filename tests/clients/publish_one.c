/* publish_one.c - a test client of the public C API (producer/conveyor.h), as
 * a program of a user would call it: conveyor_open, conveyor_publish,
 * conveyor_close. Usage: conveyor-test-publish CONFIG TYPE PAYLOAD_JSON.
 * Prints "<code> <id>" (code: conveyor_publish's return, 0 or a CONVEYOR_E*
 * value) and the error text on stderr; exits 0 when published, else 1 (2 when
 * the client cannot open). Used by tests/integration/test_bounded_queues.py. */
#include "conveyor.h"

#include <stdio.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: conveyor-test-publish CONFIG TYPE PAYLOAD_JSON\n");
        return 2;
    }
    char err[512], id[37] = "";
    int code = 0;
    conveyor_client *c = conveyor_open(argv[1], 0, err, sizeof err, &code);
    if (!c) {
        fprintf(stderr, "conveyor-test-publish: %s\n", err);
        return 2;
    }
    int rc = conveyor_publish(c, argv[2], argv[3], NULL, id);
    printf("%d %s\n", rc, id);
    if (rc < 0) fprintf(stderr, "conveyor-test-publish: %s\n", conveyor_error(c));
    conveyor_close(c);
    return rc < 0 ? 1 : 0;
}
