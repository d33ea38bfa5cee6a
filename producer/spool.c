/* spool.c - the C client's offline spool: checksummed records in one file,
 * appended and fdatasync'd, a "sent up to" marker, one writer per directory
 * (spool.h; docs/decisions.md, "The offline spool"). */
#include "spool.h"
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAGIC "CVS1"
#define HASH_BYTES 16                    /* crypto_generichash_BYTES_MIN: BLAKE2b-128 */
#define HEAD (4 + 4 + HASH_BYTES)        /* magic, length, hash */
#define BODY_MAX (128L * 1024 * 1024)    /* above limits.max_message_bytes' largest (100 MiB) */
#define MARKER_BYTES 16

struct spool {
    char *dir;
    char log_path[4096];
    int log_fd, sent_fd, lock_fd;
    int64_t size;        /* the end of the last whole record */
    int64_t sent;        /* the records before it were confirmed sent */
    long long waiting;   /* records from sent to size */
    long long max_bytes;
};

/* A growing buffer for one record's body. */
struct buf {
    char *p;
    size_t cap;
};

/* Makes b hold at least n + 1 bytes. Returns false when out of memory. */
static bool buf_fit(struct buf *b, size_t n) {
    if (n + 1 <= b->cap) return true;
    char *p = realloc(b->p, n + 1);
    if (!p) return false;
    b->p = p;
    b->cap = n + 1;
    return true;
}

static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static void put_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint64_t get_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* The checksum of a record: BLAKE2b-128 of its length (4 bytes LE) and body. */
static void record_hash(uint32_t len, const void *body, unsigned char out[HASH_BYTES]) {
    crypto_generichash_state st;
    unsigned char l[4];
    put_le32(l, len);
    crypto_generichash_init(&st, NULL, 0, HASH_BYTES);
    crypto_generichash_update(&st, l, sizeof l);
    crypto_generichash_update(&st, body, len);
    crypto_generichash_final(&st, out, HASH_BYTES);
}

/* Reads up to n bytes at off, through EINTR and short reads. Returns the bytes
 * read (fewer than n only at the end of the file), or CV_EREFUSED with errno set. */
static ssize_t read_at(int fd, void *buf, size_t n, int64_t off) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, (char *)buf + got, n - got, (off_t)(off + (int64_t)got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return CV_EREFUSED;
        if (r == 0) break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

/* Writes n bytes at off. Returns 0, or CV_EREFUSED with errno set. */
static int write_at(int fd, const void *buf, size_t n, int64_t off) {
    size_t done = 0;
    while (done < n) {
        ssize_t w = pwrite(fd, (const char *)buf + done, n - done, (off_t)(off + (int64_t)done));
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return CV_EREFUSED;
        done += (size_t)w;
    }
    return 0;
}

enum rec_check { REC_WHOLE, REC_BAD, REC_IO };

/* Checks the record at off of a file of size bytes: its magic, a length that
 * fits in the file, its checksum. REC_WHOLE with its body in b (NUL-terminated)
 * and *len; REC_BAD (torn, corrupt or not a record); REC_IO (errno set). */
static enum rec_check check_record(int fd, int64_t off, int64_t size, struct buf *b, uint32_t *len) {
    unsigned char head[HEAD], sum[HASH_BYTES];
    if (size - off < HEAD) return REC_BAD;
    ssize_t r = read_at(fd, head, HEAD, off);
    if (r < 0) return REC_IO;
    if (r < HEAD || memcmp(head, MAGIC, 4) != 0) return REC_BAD;
    *len = get_le32(head + 4);
    if (*len > BODY_MAX || (int64_t)*len > size - off - HEAD) return REC_BAD;
    if (!buf_fit(b, *len)) {
        errno = ENOMEM;
        return REC_IO;
    }
    r = read_at(fd, b->p, *len, off + HEAD);
    if (r < 0) return REC_IO;
    if ((size_t)r < *len) return REC_BAD;
    b->p[*len] = '\0';
    record_hash(*len, b->p, sum);
    return memcmp(sum, head + 8, HASH_BYTES) == 0 ? REC_WHOLE : REC_BAD;
}

/* What a walk through spool.log found. */
struct scan {
    int64_t end;            /* after the last whole record */
    int64_t bad_at;         /* where a torn or corrupt tail starts; -1: none */
    long long before, from; /* whole records before sent, and from it on */
    bool sent_found;        /* sent is 0 or the offset of a record boundary */
    int64_t first_waiting;  /* the first record at or after sent; -1: none */
};

/* Looks for a whole record after a bad one at bad (a corrupt record in the
 * middle, not a torn tail): REC_WHOLE with its offset in *at, REC_BAD when
 * none follows, REC_IO when the file cannot be read (errno set). */
static enum rec_check whole_record_after(int fd, int64_t bad, int64_t size, struct buf *b, int64_t *at) {
    char chunk[65536];
    uint32_t len;
    for (int64_t off = bad + 1; off < size; off += (int64_t)sizeof chunk - 3) {
        ssize_t r = read_at(fd, chunk, sizeof chunk, off);
        if (r < 0) return REC_IO;
        if (r < 4) return REC_BAD;
        for (char *p = chunk; (p = memmem(p, (size_t)r - (size_t)(p - chunk), MAGIC, 4)); p++) {
            int64_t cand = off + (p - chunk);
            enum rec_check c = check_record(fd, cand, size, b, &len);
            if (c == REC_WHOLE) *at = cand;
            if (c != REC_BAD) return c;
        }
        if (r < (ssize_t)sizeof chunk) return REC_BAD;
    }
    return REC_BAD;
}

/* Walks the records of path (open as fd, size bytes) from the start, with the
 * marker at sent. Returns 0 with *sc filled, or CV_EREFUSED with the reason in
 * err: a read error, or a bad record followed by a whole one (a corrupt record
 * in the middle: no repair, the file is left as it is). */
static int scan(int fd, const char *path, int64_t size, int64_t sent, struct scan *sc, char *err, size_t errlen) {
    struct buf b = {0};
    uint32_t len = 0;
    int64_t off = 0;
    memset(sc, 0, sizeof *sc);
    sc->bad_at = sc->first_waiting = -1;
    int rc = 0;
    for (;;) {
        if (off == sent) sc->sent_found = true;
        if (off >= size) break;
        enum rec_check c = check_record(fd, off, size, &b, &len);
        int64_t next = 0;
        if (c == REC_BAD) { /* a torn tail, or damage in the middle when a whole record follows */
            c = whole_record_after(fd, off, size, &b, &next);
            if (c == REC_BAD) {
                sc->bad_at = off;
                break;
            }
            if (c == REC_WHOLE) {
                snprintf(err, errlen, "the spool %s has a corrupt record at offset %lld, and whole records follow "
                         "it (at offset %lld): not repaired, nothing is sent from it; move the file aside and "
                         "keep it (its records are commands not yet sent)", path, (long long)off, (long long)next);
                rc = CV_EREFUSED;
                break;
            }
        }
        if (c == REC_IO) {
            snprintf(err, errlen, "cannot read the spool %s: %s", path, strerror(errno));
            rc = CV_EREFUSED;
            break;
        }
        if (off >= sent && sc->sent_found) {
            if (sc->first_waiting < 0) sc->first_waiting = off;
            sc->from++;
        } else {
            sc->before++;
        }
        off += HEAD + (int64_t)len;
    }
    sc->end = off < size ? off : size;
    if (sc->bad_at >= 0) sc->end = sc->bad_at;
    free(b.p);
    return rc;
}

/* The marker of spool.sent: the offset it holds, or -1 when the file is
 * empty, missing or torn (its complement does not match). */
static int64_t read_marker(int fd) {
    unsigned char m[MARKER_BYTES];
    if (fd < 0 || read_at(fd, m, sizeof m, 0) != (ssize_t)sizeof m) return -1;
    uint64_t v = get_le64(m), check = get_le64(m + 8);
    return check == ~v && v <= (uint64_t)INT64_MAX ? (int64_t)v : -1;
}

/* Writes the marker and fdatasyncs it. Returns 0 or CV_EREFUSED (errno set). */
static int write_marker(int fd, int64_t v) {
    unsigned char m[MARKER_BYTES];
    put_le64(m, (uint64_t)v);
    put_le64(m + 8, ~(uint64_t)v);
    if (write_at(fd, m, sizeof m, 0) < 0 || fdatasync(fd) < 0) return CV_EREFUSED;
    return 0;
}

/* createdAt of an envelope into out (40 bytes); "" when it has none. */
static void created_at(const char *body, char out[40]) {
    cJSON *o = cJSON_Parse(body);
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "createdAt");
    snprintf(out, 40, "%s", cJSON_IsString(t) ? t->valuestring : "");
    cJSON_Delete(o);
}

/* Opens dir/name (O_CLOEXEC; with O_CREAT in flags, mode 0600), telling in
 * *created whether it made the file. Returns the descriptor, or CV_EREFUSED
 * with errno set. */
static int open_in(const char *dir, const char *name, int flags, bool *created) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, (flags & ~O_CREAT) | O_CLOEXEC);
    if (fd >= 0) return fd;
    if (errno != ENOENT || !(flags & O_CREAT)) return CV_EREFUSED;
    fd = open(path, flags | O_CLOEXEC, 0600);
    if (fd < 0) return CV_EREFUSED;
    if (created) *created = true;
    return fd;
}

/* fsyncs the directory path (a new entry in it made durable). Returns 0 or CV_EREFUSED. */
static int sync_dir(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return CV_EREFUSED;
    int rc = fsync(fd) < 0 ? CV_EREFUSED : 0;
    close(fd);
    return rc;
}

/* Makes dir when it is missing (mode 0700) and syncs its parent. Returns 0 or CV_EREFUSED (errno set). */
static int make_dir(const char *dir) {
    if (mkdir(dir, 0700) < 0) return errno == EEXIST ? 0 : CV_EREFUSED;
    char parent[4096];
    snprintf(parent, sizeof parent, "%s", dir);
    char *slash = strrchr(parent, '/');
    if (slash == parent) slash[1] = '\0';
    else if (slash) *slash = '\0';
    else snprintf(parent, sizeof parent, ".");
    return sync_dir(parent);
}

/* Takes the lock of dir/spool.lock into s->lock_fd and writes our pid in it.
 * Returns 0, or CV_EREFUSED with the reason in err (the holder's pid named). */
static int take_lock(struct spool *s, bool *created, char *err, size_t errlen) {
    s->lock_fd = open_in(s->dir, "spool.lock", O_RDWR | O_CREAT, created);
    if (s->lock_fd < 0) {
        snprintf(err, errlen, "cannot open the spool's lock %s/spool.lock: %s", s->dir, strerror(errno));
        return CV_EREFUSED;
    }
    if (flock(s->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        if (errno != EWOULDBLOCK) {
            snprintf(err, errlen, "cannot lock the spool %s: %s", s->dir, strerror(errno));
            return CV_EREFUSED;
        }
        char pid[32] = "";
        ssize_t r = read_at(s->lock_fd, pid, sizeof pid - 1, 0);
        pid[r > 0 ? r : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        snprintf(err, errlen, "the spool %s is locked by another process%s%s%s: one writer per spool directory "
                 "(another conveyor-produce --spool or C client on it?)", s->dir, pid[0] ? " (pid " : "", pid,
                 pid[0] ? ")" : "");
        return CV_EREFUSED;
    }
    char pid[32];
    int n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(s->lock_fd, 0) < 0 || write_at(s->lock_fd, pid, (size_t)n, 0) < 0) {
        snprintf(err, errlen, "cannot write the spool's lock %s/spool.lock: %s", s->dir, strerror(errno));
        return CV_EREFUSED;
    }
    return 0;
}

/* Empties the log once nothing in it waits: truncated (fsync'd), then the marker 0.
 * Returns 0 or CV_EREFUSED (errno set). */
static int empty_log(struct spool *s) {
    if (ftruncate(s->log_fd, 0) < 0 || fsync(s->log_fd) < 0) return CV_EREFUSED;
    s->size = s->sent = 0; /* the log is empty now, whatever befalls the marker: appends go at 0 */
    s->waiting = 0;
    return write_marker(s->sent_fd, 0); /* a stale marker past the end is reset by the next open */
}

/* The repairs of spool_open after its scan: a torn tail cut off (warned), a
 * marker that is not at a record reset to 0 (everything sent again: the same
 * ids), an empty log truncated. Returns 0 or CV_EREFUSED with the reason in err. */
static int settle(struct spool *s, int64_t size, int64_t marker, const struct scan *sc, char *warn, size_t warnlen,
                  char *err, size_t errlen) {
    if (sc->bad_at >= 0) {
        char text[1024];
        if (ftruncate(s->log_fd, sc->end) < 0 || fsync(s->log_fd) < 0) {
            snprintf(err, errlen, "cannot cut the torn end of the spool %s: %s", s->log_path, strerror(errno));
            return CV_EREFUSED;
        }
        snprintf(text, sizeof text, "the spool %s ended in a torn or corrupt record: dropped its %lld bytes at offset "
                 "%lld (an append cut short by a crash or a power loss); that one command is lost, the %lld before "
                 "it are kept", s->log_path, (long long)(size - sc->end), (long long)sc->end,
                 sc->before + sc->from);
        log_warn("%s", text);
        if (warn) snprintf(warn, warnlen, "%s", text);
    }
    s->size = sc->end;
    s->sent = sc->sent_found ? marker : 0;
    s->waiting = sc->sent_found ? sc->from : sc->before + sc->from;
    if (!sc->sent_found && marker > 0 && marker < s->size)
        log_warn("the spool %s: its sent marker (%lld) is not at a record: every record is sent again (the same "
                 "ids: each applied once)", s->log_path, (long long)marker);
    int rc = 0;
    if (s->waiting == 0 && (s->size > 0 || marker != 0)) rc = empty_log(s);
    else if (s->sent != marker) rc = write_marker(s->sent_fd, s->sent);
    if (rc < 0) snprintf(err, errlen, "cannot write the spool %s: %s", s->log_path, strerror(errno));
    return rc;
}

int spool_open(const char *dir, long long max_bytes, struct spool **out, char *warn, size_t warnlen, char *err,
               size_t errlen) {
    *out = NULL;
    if (warn && warnlen) warn[0] = '\0';
    if (sodium_init() < 0) {
        snprintf(err, errlen, "libsodium cannot be initialised");
        return CV_EREFUSED;
    }
    struct spool *s = calloc(1, sizeof *s);
    if (!s || !(s->dir = strdup(dir))) {
        free(s);
        snprintf(err, errlen, "out of memory");
        return CV_EREFUSED;
    }
    s->log_fd = s->sent_fd = s->lock_fd = -1;
    s->max_bytes = max_bytes;
    snprintf(s->log_path, sizeof s->log_path, "%s/spool.log", dir);
    bool created = false;
    int rc = make_dir(dir);
    if (rc < 0) snprintf(err, errlen, "cannot make the spool directory %s: %s", dir, strerror(errno));
    if (rc == 0) rc = take_lock(s, &created, err, errlen);
    if (rc == 0) {
        s->log_fd = open_in(dir, "spool.log", O_RDWR | O_CREAT, &created);
        s->sent_fd = s->log_fd < 0 ? CV_EREFUSED : open_in(dir, "spool.sent", O_RDWR | O_CREAT, &created);
        if (s->log_fd < 0 || s->sent_fd < 0 || (created && sync_dir(dir) < 0)) {
            snprintf(err, errlen, "cannot open the spool %s: %s", s->log_path, strerror(errno));
            rc = CV_EREFUSED;
        }
    }
    struct stat st;
    if (rc == 0 && fstat(s->log_fd, &st) < 0) {
        snprintf(err, errlen, "cannot read the spool %s: %s", s->log_path, strerror(errno));
        rc = CV_EREFUSED;
    }
    if (rc == 0) {
        int64_t marker = read_marker(s->sent_fd);
        struct scan sc;
        rc = scan(s->log_fd, s->log_path, (int64_t)st.st_size, marker < 0 ? 0 : marker, &sc, err, errlen);
        if (rc == 0) rc = settle(s, (int64_t)st.st_size, marker < 0 ? 0 : marker, &sc, warn, warnlen, err, errlen);
    }
    if (rc < 0) {
        spool_close(s);
        return rc;
    }
    *out = s;
    return 0;
}

void spool_close(struct spool *s) {
    if (!s) return;
    if (s->log_fd >= 0) close(s->log_fd);
    if (s->sent_fd >= 0) close(s->sent_fd);
    if (s->lock_fd >= 0) close(s->lock_fd);
    free(s->dir);
    free(s);
}

long long spool_waiting(const struct spool *s) { return s ? s->waiting : 0; }

const char *spool_dir(const struct spool *s) { return s->dir; }

int spool_append(struct spool *s, const char *const *bodies, const size_t *lens, int n, int *appended, char *err,
                 size_t errlen) {
    *appended = 0;
    size_t total = 0;
    int k = 0;
    while (k < n && lens[k] <= (size_t)BODY_MAX &&
           s->size + (int64_t)(total + HEAD + lens[k]) <= (int64_t)s->max_bytes) {
        total += HEAD + lens[k];
        k++;
    }
    if (k > 0) {
        unsigned char *buf = malloc(total), *p = buf;
        if (!buf) {
            snprintf(err, errlen, "out of memory");
            return CV_EREFUSED;
        }
        for (int i = 0; i < k; i++) {
            memcpy(p, MAGIC, 4);
            put_le32(p + 4, (uint32_t)lens[i]);
            record_hash((uint32_t)lens[i], bodies[i], p + 8);
            memcpy(p + HEAD, bodies[i], lens[i]);
            p += HEAD + lens[i];
        }
        int rc = write_at(s->log_fd, buf, total, s->size);
        free(buf);
        if (rc < 0 || fdatasync(s->log_fd) < 0) {
            int e = errno;
            if (ftruncate(s->log_fd, s->size) == 0) (void)fdatasync(s->log_fd); /* back to where it was */
            snprintf(err, errlen, "cannot write the spool %s: %s", s->log_path, strerror(e));
            return CV_EREFUSED;
        }
        s->size += (int64_t)total;
        s->waiting += k;
        *appended = k;
    }
    if (k == n) return 0;
    snprintf(err, errlen, "the spool %s is full: %lld bytes of at most %lld (producer.spool_max_bytes) hold %lld "
             "commands not yet sent; %d more not spooled (send what waits with conveyor-produce --spool %s --flush "
             "once the broker is back)", s->dir, (long long)s->size, s->max_bytes, s->waiting, n - k, s->dir);
    return CV_EFULL;
}

int spool_read(struct spool *s, struct spool_record *recs, int max, char *err, size_t errlen) {
    int n = 0;
    int64_t off = s->sent;
    struct buf b = {0};
    uint32_t len;
    while (n < max && off < s->size) {
        enum rec_check c = check_record(s->log_fd, off, s->size, &b, &len);
        if (c != REC_WHOLE) {
            if (c == REC_IO) snprintf(err, errlen, "cannot read the spool %s: %s", s->log_path, strerror(errno));
            else snprintf(err, errlen, "the spool %s changed under its lock: the record at offset %lld is corrupt "
                          "now", s->log_path, (long long)off);
            spool_records_free(recs, n);
            free(b.p);
            return CV_EREFUSED;
        }
        recs[n] = (struct spool_record){b.p, len, off, off + HEAD + (int64_t)len};
        b = (struct buf){0};
        off = recs[n++].end;
    }
    free(b.p);
    return n;
}

void spool_records_free(struct spool_record *recs, int n) {
    for (int i = 0; i < n; i++) {
        free(recs[i].body);
        recs[i].body = NULL;
    }
}

int spool_mark_sent(struct spool *s, int64_t end, long long nrecords, char *err, size_t errlen) {
    int rc = 0;
    if (end >= s->size) rc = empty_log(s); /* all sent: nothing to keep */
    else if ((rc = write_marker(s->sent_fd, end)) == 0) s->sent = end;
    if (rc < 0) {
        snprintf(err, errlen, "cannot write the spool %s: %s", s->log_path, strerror(errno));
        return rc;
    }
    if (s->size > 0) s->waiting -= nrecords; /* else empty_log emptied it */
    return 0;
}

int spool_status(const char *dir, struct spool_status *st, char *err, size_t errlen) {
    memset(st, 0, sizeof *st);
    int log_fd = open_in(dir, "spool.log", O_RDONLY, NULL);
    if (log_fd < 0) {
        if (errno == ENOENT) return 0; /* no spool yet: nothing waits */
        snprintf(err, errlen, "cannot open the spool %s/spool.log: %s", dir, strerror(errno));
        return CV_EREFUSED;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/spool.log", dir);
    int sent_fd = open_in(dir, "spool.sent", O_RDONLY, NULL);
    int64_t marker = read_marker(sent_fd);
    if (sent_fd >= 0) close(sent_fd);
    struct stat sb;
    struct scan sc;
    int rc = fstat(log_fd, &sb) < 0 ? CV_EREFUSED : 0;
    if (rc < 0) snprintf(err, errlen, "cannot read the spool %s: %s", path, strerror(errno));
    if (rc == 0) rc = scan(log_fd, path, (int64_t)sb.st_size, marker < 0 ? 0 : marker, &sc, err, errlen);
    if (rc == 0) {
        st->records = sc.sent_found ? sc.from : sc.before + sc.from;
        st->bytes = (long long)sb.st_size;
        st->sent_offset = sc.sent_found ? (marker < 0 ? 0 : marker) : 0;
        st->torn_bytes = (long long)sb.st_size - sc.end;
        int64_t first = sc.sent_found ? sc.first_waiting : (st->records ? 0 : -1);
        struct buf b = {0};
        uint32_t len;
        if (first >= 0 && check_record(log_fd, first, sc.end, &b, &len) == REC_WHOLE) created_at(b.p, st->oldest);
        free(b.p);
    }
    close(log_fd);
    return rc;
}
