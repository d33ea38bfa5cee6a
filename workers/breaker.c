/* breaker.c - the database breaker: a pool's workers stop taking while
 * PostgreSQL fails, and spend no attempt of any command for its sake.
 *
 *   closed     workers take; each failure of the database (breaker_failure)
 *              adds one to a count of consecutive failures, each batch that
 *              went through (breaker_success) clears it; at breaker.failures
 *   open       every worker hands back what it holds (broker_release: no
 *              handler start counted), closes its broker and database
 *              connections and takes nothing; after a backoff (breaker.
 *              backoff_ms, doubling per failed probe up to max_backoff_ms,
 *              jittered) one worker claims the probe
 *   half-open  that worker connects and runs one command (or, with none
 *              waiting, one statement): success closes the breaker, a failure
 *              opens it again; the others keep waiting
 *
 * One breaker per pool: the state is on one page the supervisor maps before
 * it forks (MAP_SHARED, like queue_pause.c's), under a process-shared robust
 * mutex (a holder killed -9 leaves it to the next, EOWNERDEAD). Every
 * transition is made, and logged, by the one process that makes it: once per
 * pool, never once per worker. The HTTP child reads it for /readyz, /metrics
 * and the dashboard. Without the page (mapping refused, or a process that is
 * not a pool's) the breaker is the process's own.
 *
 * What is the database's failure (breaker_dependency_failed), not a
 * command's: no connection (refused, timed out, lost mid-transaction: the
 * server shut down or crashed), SQLSTATE class 08, 53300 too many
 * connections, 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot
 * connect now. A statement or lock timeout, a serialization failure or a
 * deadlock leaves the connection working: they stay the command's own
 * retries (worker.c, attempt_failed).
 */
#include "workers.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* A probe whose worker neither ended it nor died within this long is taken over. */
#define PROBE_STALE_MS 60000

struct breaker_page {
    pthread_mutex_t lock;
    int state;              /* enum breaker_state */
    int failures;           /* consecutive failures while closed */
    int probes_failed;      /* since it opened: the backoff's exponent */
    int64_t opened_ms;      /* monotonic ms it opened (the outage's start) */
    int64_t probe_at_ms;    /* monotonic ms from which a probe may be claimed */
    int64_t probe_ms;       /* monotonic ms the current probe was claimed */
    pid_t prober;           /* the probing process while half-open */
    uint64_t opens;         /* times it opened from closed */
    char reason[256];       /* the failure that opened it (last failed probe's) */
};

static struct breaker_page local;
static struct breaker_page *page; /* &local until breaker_init maps one; set on first use */

/* Initializes p's mutex, process-shared when shared (robust either way). */
static bool lock_init(struct breaker_page *p, bool shared) {
    pthread_mutexattr_t a;
    if (pthread_mutexattr_init(&a) != 0) return false;
    bool ok = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST) == 0 &&
              (!shared || pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED) == 0) &&
              pthread_mutex_init(&p->lock, &a) == 0;
    pthread_mutexattr_destroy(&a);
    return ok;
}

/* The page, the process's own until breaker_init mapped one. */
static struct breaker_page *the_page(void) {
    if (!page) {
        (void)lock_init(&local, false);
        page = &local;
    }
    return page;
}

bool breaker_init(void) {
    // cppcheck-suppress invalidFunctionArg ; fd -1 is what MAP_ANONYMOUS asks for (Linux ignores it)
    void *p = mmap(NULL, sizeof *page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    struct breaker_page *shared = p;
    memset(shared, 0, sizeof *shared);
    if (!lock_init(shared, true)) {
        munmap(p, sizeof *shared);
        return false;
    }
    page = shared;
    return true;
}

/* Takes the page's lock (made consistent when its holder died holding it). */
static struct breaker_page *lock_page(void) {
    struct breaker_page *p = the_page();
    if (pthread_mutex_lock(&p->lock) == EOWNERDEAD) (void)pthread_mutex_consistent(&p->lock);
    return p;
}

static void unlock_page(struct breaker_page *p) { (void)pthread_mutex_unlock(&p->lock); }

/* Opens p (lock held) with why; the next probe after the backoff of its
 * probes_failed-th failed probe. Returns that backoff in ms. */
static int open_now(struct breaker_page *p, const struct cfg *cfg, const char *why) {
    int wait = backoff_ms(p->probes_failed, cfg->breaker_backoff_ms, cfg->breaker_max_backoff_ms);
    p->state = BREAKER_OPEN;
    p->prober = 0;
    p->probe_at_ms = clock_mono_ms() + wait;
    snprintf(p->reason, sizeof p->reason, "%s", why && *why ? why : "the database failed");
    return wait;
}

void breaker_failure(const struct cfg *cfg, const char *why) {
    struct breaker_page *p = lock_page();
    if (p->state == BREAKER_CLOSED && ++p->failures >= cfg->breaker_failures) {
        p->probes_failed = 0;
        p->opened_ms = clock_mono_ms();
        p->opens++;
        int wait = open_now(p, cfg, why);
        log_warn("database breaker open: %s (%d consecutive failures); the pool's workers hand back what they "
                 "hold without spending an attempt and take nothing; a probe in %d ms",
                 p->reason, p->failures, wait);
    } else if (p->state == BREAKER_HALF_OPEN && p->prober == getpid()) {
        p->probes_failed++;
        int wait = open_now(p, cfg, why);
        log_warn("database breaker open again: the probe failed (%s); the next probe in %d ms", p->reason, wait);
    }
    unlock_page(p);
}

void breaker_success(void) {
    struct breaker_page *p = the_page();
    /* the common case, closed with no failure counted, takes no lock */
    if (__atomic_load_n(&p->state, __ATOMIC_RELAXED) == BREAKER_CLOSED &&
        __atomic_load_n(&p->failures, __ATOMIC_RELAXED) == 0)
        return;
    p = lock_page();
    if (p->state == BREAKER_CLOSED) {
        p->failures = 0;
    } else if (p->state == BREAKER_HALF_OPEN && p->prober == getpid()) {
        p->state = BREAKER_CLOSED;
        p->failures = 0;
        p->prober = 0;
        log_info("database breaker closed: the probe succeeded; the pool takes again (open for %lld ms)",
                 (long long)(clock_mono_ms() - p->opened_ms));
    }
    unlock_page(p);
}

/* True when the probe of p (half-open) can be taken over: its process is gone
 * or it has run for PROBE_STALE_MS. */
static bool probe_abandoned(const struct breaker_page *p, int64_t now) {
    return (p->prober > 0 && kill(p->prober, 0) < 0 && errno == ESRCH) || now - p->probe_ms > PROBE_STALE_MS;
}

enum breaker_turn breaker_turn(void) {
    struct breaker_page *p = the_page();
    if (__atomic_load_n(&p->state, __ATOMIC_RELAXED) == BREAKER_CLOSED) return BREAKER_TAKE;
    p = lock_page();
    enum breaker_turn turn = BREAKER_WAIT;
    int64_t now = clock_mono_ms();
    if (p->state == BREAKER_CLOSED) {
        turn = BREAKER_TAKE;
    } else if (p->state == BREAKER_HALF_OPEN && p->prober == getpid()) {
        turn = BREAKER_PROBE;
    } else if ((p->state == BREAKER_OPEN && now >= p->probe_at_ms) ||
               (p->state == BREAKER_HALF_OPEN && probe_abandoned(p, now))) {
        p->state = BREAKER_HALF_OPEN;
        p->prober = getpid();
        p->probe_ms = now;
        turn = BREAKER_PROBE;
        log_info("database breaker half-open: worker %d probes the database with one command", (int)getpid());
    }
    unlock_page(p);
    return turn;
}

enum breaker_state breaker_read(char *why, size_t n, uint64_t *opens) {
    struct breaker_page *p = lock_page();
    enum breaker_state st = (enum breaker_state)p->state;
    if (why) {
        if (st == BREAKER_OPEN)
            snprintf(why, n, "open: the database failed (%s); a probe in %lld ms", p->reason,
                     (long long)(p->probe_at_ms > clock_mono_ms() ? p->probe_at_ms - clock_mono_ms() : 0));
        else if (st == BREAKER_HALF_OPEN)
            snprintf(why, n, "half-open: probing the database with one command (it failed: %s)", p->reason);
        else
            snprintf(why, n, "closed");
    }
    if (opens) *opens = p->opens;
    unlock_page(p);
    return st;
}

bool breaker_dependency_failed(const struct db *db) {
    if (!db_ok(db)) return true;
    const char *s = db_sqlstate(db);
    return strncmp(s, "08", 2) == 0 || strcmp(s, "53300") == 0 || strcmp(s, "57P01") == 0 ||
           strcmp(s, "57P02") == 0 || strcmp(s, "57P03") == 0;
}
