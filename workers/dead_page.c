/* dead_page.c - a page of a queue's dead letters, and one letter by its key,
 * on either transport, without taking any off its queue: Redis pages its list
 * with LRANGE (broker_dead_page), RabbitMQ reads the index in PostgreSQL after
 * checking it against the queue (dead_index.c). The cost of a page is the
 * page's, not the queue's.
 *
 * A cursor is "<offset>" (Redis) or "<offset>.<last row id>" (RabbitMQ), the
 * offset being the letters before the page (its first is number offset + 1).
 * Callers treat it as opaque text.
 */
#include "workers.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void dead_page_free(struct dead_page *p) {
    if (!p) return;
    dead_letters_free(p->d, p->n);
    free(p->number);
    memset(p, 0, sizeof *p);
}

/* Parses cursor (NULL or "": the first page) into *offset and *after. Returns true, or false when it is not one. */
static bool parse_cursor(const char *cursor, long *offset, long long *after) {
    *offset = 0;
    *after = 0;
    if (!cursor || !*cursor) return true;
    char *end;
    errno = 0;
    long o = strtol(cursor, &end, 10);
    if (errno || end == cursor || o < 0) return false;
    long long a = 0;
    if (*end == '.') {
        char *e2;
        a = strtoll(end + 1, &e2, 10);
        if (errno || e2 == end + 1 || a < 0 || *e2) return false;
    } else if (*end) return false;
    *offset = o;
    *after = a;
    return true;
}

int dead_page_read(struct broker *b, struct db *db, const struct cfg_queue *q, const char *cursor, int limit,
                   struct dead_page *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    long offset;
    long long after;
    if (limit < 1 || limit > DEAD_PAGE_MAX) {
        snprintf(err, errlen, "limit must be 1 to %d", DEAD_PAGE_MAX);
        return CV_EREJECT;
    }
    if (!parse_cursor(cursor, &offset, &after)) {
        snprintf(err, errlen, "'%s' is not a cursor this reader gave", cursor);
        return CV_EREJECT;
    }
    int rc;
    long long *ids = NULL;
    if (q->transport == TRANSPORT_REDIS) {
        if ((rc = broker_dead_count(b, q, &out->total)) == 0) rc = broker_dead_page(b, q, offset, limit, &out->d, &out->n);
        if (rc < 0) {
            snprintf(err, errlen, "cannot read the dead letters of %s: %s", q->name, broker_error(b));
            dead_page_free(out);
            return rc;
        }
    } else {
        if (!db) {
            snprintf(err, errlen, "reading RabbitMQ's dead letters needs the database (their index)");
            return CV_ERETRY;
        }
        if ((rc = dead_index_sync(db, b, q, &out->total, err, errlen)) < 0) return rc;
        out->rebuilt = rc > 0;
        /* after a rebuild the row ids changed: the cursor's offset still places the page */
        if ((rc = out->rebuilt ? dead_index_page(db, q, 0, offset, limit, &out->d, &ids, &out->n)
                               : dead_index_page(db, q, after, after ? 0 : offset, limit, &out->d, &ids, &out->n)) < 0) {
            snprintf(err, errlen, "cannot read the dead-letter index of %s: %s", q->name, db_errstr(db));
            dead_page_free(out);
            free(ids);
            return rc;
        }
    }
    out->offset = offset;
    out->number = xcalloc(out->n ? (size_t)out->n : 1, sizeof *out->number);
    for (int i = 0; i < out->n; i++) out->number[i] = offset + i + 1;
    bool more = out->n == limit && offset + out->n < out->total;
    if (more && ids) snprintf(out->next, sizeof out->next, "%ld.%lld", offset + out->n, ids[out->n - 1]);
    else if (more) snprintf(out->next, sizeof out->next, "%ld", offset + out->n);
    free(ids);
    return 0;
}

int dead_page_find(struct broker *b, struct db *db, const struct cfg_queue *q, const char *key, long number,
                   struct dead_page *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    if (number > 0) { /* #N: a page of one */
        char cursor[32];
        snprintf(cursor, sizeof cursor, "%ld", number - 1);
        return dead_page_read(b, db, q, cursor, 1, out, err, errlen);
    }
    int rc;
    if (q->transport == TRANSPORT_RABBITMQ) {
        if (!db) {
            snprintf(err, errlen, "reading RabbitMQ's dead letters needs the database (their index)");
            return CV_ERETRY;
        }
        if ((rc = dead_index_sync(db, b, q, &out->total, err, errlen)) < 0) return rc;
        out->rebuilt = rc > 0;
        if ((rc = dead_index_find(db, q, key, &out->d, &out->number, &out->n)) < 0) {
            snprintf(err, errlen, "cannot read the dead-letter index of %s: %s", q->name, db_errstr(db));
            dead_page_free(out);
        }
        return rc;
    }
    /* Redis: page by page, nothing taken (a key is not indexed there) */
    char cursor[32] = "";
    int cap = 0;
    for (;;) {
        struct dead_page p;
        if ((rc = dead_page_read(b, db, q, cursor, DEAD_PAGE_MAX, &p, err, errlen)) < 0) {
            dead_page_free(out);
            return rc;
        }
        out->total = p.total;
        for (int i = 0; i < p.n; i++) {
            char k[DEAD_KEY_LEN + 1];
            dead_letter_key(&p.d[i], k);
            if (strcmp(k, key) != 0) continue;
            if (out->n == cap) {
                cap = cap ? 2 * cap : 4;
                out->d = xrealloc(out->d, (size_t)cap * sizeof *out->d);
                out->number = xrealloc(out->number, (size_t)cap * sizeof *out->number);
            }
            out->d[out->n] = p.d[i];
            out->number[out->n++] = p.number[i];
            memset(&p.d[i], 0, sizeof p.d[i]); /* moved */
        }
        snprintf(cursor, sizeof cursor, "%s", p.next);
        dead_page_free(&p);
        if (!cursor[0]) return 0;
    }
}
