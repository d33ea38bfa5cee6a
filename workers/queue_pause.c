/* queue_pause.c - queues paused from the terminal (conveyor-admin queue pause).
 *
 * The state lives in PostgreSQL (queue_state, sql/0005), the one store every
 * pool has. A pool reads it through one shared page that the supervisor maps
 * before it forks: the paused set and when it was last read. A worker about to
 * take asks queue_pause_refresh, which reads the table again only when the page
 * is older than REFRESH_MS, and only one process of the pool at a time does
 * (the one that claims the refresh), so a pool makes at most about two small
 * queries a second however many workers it runs. A worker that finds its queue
 * paused stops taking (worker.c), so every pool stops within REFRESH_MS plus a
 * worker's longest wait for a message. Without the page (conveyor-admin, or
 * the mapping refused) the same state is kept in the process.
 *
 * The page is written under a seqlock: a writer takes the writer flag (a
 * timestamp: one left by a process killed while writing is taken over after
 * a second), makes seq odd, writes, makes it even; a reader copies and tries
 * again when seq was odd or moved. The query runs outside the flag.
 */
#include "workers.h"

#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#define REFRESH_MS 300
#define PAUSED_MAX 64      /* paused queues a pool knows of; more are read as not paused (logged) */
#define WRITER_STALE_MS 1000

struct pause_page {
    int64_t checked_ms;            /* monotonic ms of the last claimed refresh (0: never) */
    int64_t writer;                /* monotonic ms a writer took the page, or 0 */
    uint32_t seq;                  /* odd while written */
    int32_t n;                     /* paused queues in names */
    char names[PAUSED_MAX][CFG_NAME_MAX];
};

static struct pause_page local; /* without a shared page: this process only */
static struct pause_page *page = &local;

bool queue_pause_init(void) {
    // cppcheck-suppress invalidFunctionArg ; fd -1 is what MAP_ANONYMOUS asks for (Linux ignores it)
    void *p = mmap(NULL, sizeof *page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    page = p;
    memset(page, 0, sizeof *page);
    return true;
}

/* True when name is in the page's paused set, read consistently: again while
 * a writer is copying in its names (nanoseconds); after many tries (a writer
 * killed mid-copy, until the next one repairs seq) as it is. Copies nothing:
 * each take asks, so it reads only the names it compares. */
static bool in_page(const char *name) {
    for (int tries = 0;; tries++) {
        uint32_t s = __atomic_load_n(&page->seq, __ATOMIC_ACQUIRE);
        if ((s & 1) && tries < 10000) {
            sched_yield();
            continue;
        }
        bool found = false;
        int n = page->n < PAUSED_MAX ? page->n : PAUSED_MAX;
        for (int i = 0; i < n && !found; i++) found = strncmp(page->names[i], name, CFG_NAME_MAX) == 0;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&page->seq, __ATOMIC_RELAXED) == s || tries >= 10000) return found;
    }
}

/* Writes the paused set (n names of r's first column) into the page, unless
 * another writer holds it (its result is as fresh). */
static void write_page(PGresult *r, int n) {
    int64_t now = clock_mono_ms(), held = 0;
    if (!__atomic_compare_exchange_n(&page->writer, &held, now, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED) &&
        !(now - held > WRITER_STALE_MS &&
          __atomic_compare_exchange_n(&page->writer, &held, now, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)))
        return;
    uint32_t s = __atomic_load_n(&page->seq, __ATOMIC_RELAXED);
    if (s & 1) s++; /* a writer died mid-copy: start from an even number again */
    __atomic_store_n(&page->seq, s + 1, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    page->n = 0;
    for (int i = 0; i < n && page->n < PAUSED_MAX; i++)
        snprintf(page->names[page->n++], CFG_NAME_MAX, "%s", PQgetvalue(r, i, 0));
    __atomic_store_n(&page->seq, s + 2, __ATOMIC_RELEASE);
    __atomic_store_n(&page->writer, 0, __ATOMIC_RELEASE);
}

int queue_pause_refresh(struct db *db) {
    int64_t now = clock_mono_ms(), seen = __atomic_load_n(&page->checked_ms, __ATOMIC_ACQUIRE);
    if (seen && now - seen < REFRESH_MS) return 0;
    if (!__atomic_compare_exchange_n(&page->checked_ms, &seen, now, false, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        return 0; /* another process of the pool is reading it */
    char limit[16];
    snprintf(limit, sizeof limit, "%d", PAUSED_MAX + 1);
    const char *p[1] = {limit};
    PGresult *r;
    int rc = db_exec(db, "SELECT queue FROM queue_state WHERE paused ORDER BY queue LIMIT $1::int", 1, p, &r);
    if (rc < 0) return rc; /* logged by db_exec; the last state read stays */
    int n = PQntuples(r);
    if (n > PAUSED_MAX) log_warn("more than %d queues are paused; a pool knows of the first %d only", PAUSED_MAX,
                                 PAUSED_MAX);
    write_page(r, n);
    PQclear(r);
    return 0;
}

bool queue_paused(const struct cfg_queue *q) { return in_page(q->name); }

bool queue_pause_known(void) { return __atomic_load_n(&page->seq, __ATOMIC_ACQUIRE) != 0; }


int queue_pause_set(struct db *db, const char *queue, bool paused, const char *by, const char *note) {
    const char *p[4] = {queue, paused ? "true" : "false", by, note};
    return db_exec(db, "INSERT INTO queue_state (queue, paused, updated_by, note) VALUES ($1, $2::boolean, $3, $4) "
                       "ON CONFLICT (queue) DO UPDATE SET paused = $2::boolean, updated_at = now(), "
                       "updated_by = $3, note = $4",
                   4, p, NULL);
}
