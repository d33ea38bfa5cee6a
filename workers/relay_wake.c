/* relay_wake.c - waking the pool's own relay without PostgreSQL.
 *
 * The supervisor maps one shared page and opens an eventfd before it forks;
 * every child inherits both. The page holds the pid of the pool's relay while
 * that relay is the active one (it holds the relay lock). A worker that
 * committed events then writes the eventfd: a system call, where a NOTIFY is a
 * transaction of its own and takes PostgreSQL's global notify lock. When the
 * active relay is another pool's (another host), the pool's relay stands by
 * and workers NOTIFY instead. A wake-up lost in a race (the relay exiting as a
 * worker signals it) only delays the events to the relay's next poll.
 */
#include "workers.h"

#include <errno.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

struct relay_wake {
    pid_t active;   /* the pool's relay while it is the active one, else 0 */
};

static struct relay_wake *shared; /* NULL until relay_wake_init: nothing local to wake */
static int wake_fd = -1;

bool relay_wake_init(void) {
    // cppcheck-suppress invalidFunctionArg ; fd -1 is what MAP_ANONYMOUS asks for (Linux ignores it)
    void *page = mmap(NULL, sizeof *shared, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED) return false;
    int fd = eventfd(0, EFD_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        munmap(page, sizeof *shared);
        errno = e; /* the caller logs the eventfd's reason */
        return false;
    }
    shared = page;
    shared->active = 0;
    wake_fd = fd;
    return true;
}

void relay_wake_set_active(bool active) {
    if (!shared) return;
    pid_t self = getpid(), expected = self;
    if (active) __atomic_store_n(&shared->active, self, __ATOMIC_SEQ_CST);
    else __atomic_compare_exchange_n(&shared->active, &expected, 0, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

void relay_wake_forget(pid_t pid) {
    if (!shared) return;
    __atomic_compare_exchange_n(&shared->active, &pid, 0, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

bool relay_wake_is_local(void) { return shared && __atomic_load_n(&shared->active, __ATOMIC_SEQ_CST) != 0; }

void relay_wake_signal(void) {
    uint64_t one = 1;
    if (wake_fd >= 0 && write(wake_fd, &one, sizeof one) < 0) {
        /* EAGAIN: the counter is full, so the relay has a wake-up pending anyway */
    }
}

int relay_wake_fd(void) { return wake_fd; }

void relay_wake_clear(void) {
    uint64_t n;
    if (wake_fd >= 0 && read(wake_fd, &n, sizeof n) < 0) {
        /* EAGAIN: nothing pending */
    }
}
