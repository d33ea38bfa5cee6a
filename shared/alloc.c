/* alloc.c - allocations for the places that have no error to return. */
#include "core.h"

#include <stdlib.h>
#include <string.h>

/* Logs that size bytes could not be had and aborts (never returns). */
static void out_of_memory(size_t size) {
    log_error("out of memory (%zu bytes): aborting", size);
    abort();
}

void *xmalloc(size_t size) {
    void *p = malloc(size ? size : 1);
    if (!p) out_of_memory(size);
    return p;
}

void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) out_of_memory(n * size);
    return p;
}

void *xrealloc(void *p, size_t size) {
    void *q = realloc(p, size ? size : 1);
    if (!q) out_of_memory(size); /* p is still valid, but the process ends here */
    return q;
}

char *xstrdup(const char *s) {
    char *p = strdup(s);
    if (!p) out_of_memory(strlen(s) + 1);
    return p;
}

char *xstrndup(const char *s, size_t n) {
    char *p = strndup(s, n);
    if (!p) out_of_memory(n + 1);
    return p;
}
