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

#define MAGIC "CVS2"
#define HASH_BYTES 16                    /* crypto_generichash_BYTES_MIN: BLAKE2b-128 */
#define FIELDS 16                        /* length (u32), batch (u64), flags (u32): hashed with the body */
#define HEAD (4 + FIELDS + HASH_BYTES)   /* magic, fields, hash */
#define LAST_OF_BATCH 1u                 /* flags: the last record of its append */
#define STAGE_BYTES 65536                /* an append's headers and small bodies, gathered per write */
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
    uint64_t batch;      /* the number of the next append (monotonic within the file) */
    pid_t pid;           /* the process that opened it (a fork's child shares the lock: refused) */
};

/* A record's header fields (after its magic). */
struct rec {
    uint32_t len;
    uint64_t batch;
    uint32_t flags;
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

/* Fills head (HEAD bytes) for a record of r with body: magic, fields, and the
 * checksum, BLAKE2b-128 of the fields (16 bytes LE) and the body. */
static void record_head(const struct rec *r, const void *body, unsigned char *head) {
    crypto_generichash_state st;
    memcpy(head, MAGIC, 4);
    put_le32(head + 4, r->len);
    put_le64(head + 8, r->batch);
    put_le32(head + 16, r->flags);
    crypto_generichash_init(&st, NULL, 0, HASH_BYTES);
    crypto_generichash_update(&st, head + 4, FIELDS);
    crypto_generichash_update(&st, body, r->len);
    crypto_generichash_final(&st, head + 4 + FIELDS, HASH_BYTES);
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
 * and its fields in *rec; REC_BAD (torn, corrupt or not a record); REC_IO (errno set). */
static enum rec_check check_record(int fd, int64_t off, int64_t size, struct buf *b, struct rec *rec) {
    unsigned char head[HEAD], want[HEAD];
    if (size - off < HEAD) return REC_BAD;
    ssize_t r = read_at(fd, head, HEAD, off);
    if (r < 0) return REC_IO;
    if (r < HEAD || memcmp(head, MAGIC, 4) != 0) return REC_BAD;
    *rec = (struct rec){get_le32(head + 4), get_le64(head + 8), get_le32(head + 16)};
    if (rec->len > BODY_MAX || (int64_t)rec->len > size - off - HEAD) return REC_BAD;
    if (!buf_fit(b, rec->len)) {
        errno = ENOMEM;
        return REC_IO;
    }
    r = read_at(fd, b->p, rec->len, off + HEAD);
    if (r < 0) return REC_IO;
    if ((size_t)r < rec->len) return REC_BAD;
    b->p[rec->len] = '\0';
    record_head(rec, b->p, want);
    return memcmp(want, head, HEAD) == 0 ? REC_WHOLE : REC_BAD;
}

/* What a walk through spool.log found. */
struct scan {
    int64_t end;            /* after the last whole record kept */
    int64_t bad_at;         /* where the cut starts (an append that did not finish); -1: none */
    long long cut_records;  /* whole records in the cut (of that append) */
    bool torn;              /* the cut holds bytes that are no whole record */
    long long before, from; /* whole records kept before sent, and from it on */
    bool sent_found;        /* sent is 0 or the offset of a record boundary */
    int64_t first_waiting;  /* the first record at or after sent; -1: none */
    uint64_t last_batch;    /* the highest batch number seen */
};

/* Looks for a whole record after a bad one at bad: REC_WHOLE with its offset
 * in *at and its fields in *rec, REC_BAD when none follows, REC_IO when the
 * file cannot be read (errno set). */
static enum rec_check whole_record_after(int fd, int64_t bad, int64_t size, struct buf *b, int64_t *at,
                                         struct rec *rec) {
    char chunk[65536];
    for (int64_t off = bad + 1; off < size; off += (int64_t)sizeof chunk - 3) {
        ssize_t r = read_at(fd, chunk, sizeof chunk, off);
        if (r < 0) return REC_IO;
        if (r < 4) return REC_BAD;
        for (char *p = chunk; (p = memmem(p, (size_t)r - (size_t)(p - chunk), MAGIC, 4)); p++) {
            int64_t cand = off + (p - chunk);
            enum rec_check c = check_record(fd, cand, size, b, rec);
            if (c == REC_WHOLE) *at = cand;
            if (c != REC_BAD) return c;
        }
        if (r < (ssize_t)sizeof chunk) return REC_BAD;
    }
    return REC_BAD;
}

/* The walk of scan: where it is, and the append (batch) it is in. */
struct walk {
    bool open;              /* the records since batch_at lack their last one */
    uint64_t batch;         /* the open batch's number */
    int64_t batch_at;       /* its first record (or the damage that starts it) */
    long long saved;        /* before + from when it started */
    long long in_batch;     /* its whole records */
    int64_t damage_at;      /* the first bad byte in it; -1: none */
};

/* Walks the records of path (open as fd, size bytes) from the start, with the
 * marker at sent. An append (a batch of records, the last one flagged) that
 * did not finish -- its last record missing, whatever lies between: torn
 * records, zeros, whole records of that batch -- is never confirmed: when it is
 * the file's last, it is the cut (sc->bad_at, from its first record). Returns 0
 * with *sc filled, or CV_EREFUSED with the reason in err: a read error, or
 * damage followed by a whole record of a finished or another batch (no repair:
 * the file is left as it is). */
static int scan(int fd, const char *path, int64_t size, int64_t sent, struct scan *sc, char *err, size_t errlen) {
    struct buf b = {0};
    struct rec r = {0};
    struct walk w = {.damage_at = -1};
    int64_t off = 0;
    memset(sc, 0, sizeof *sc);
    sc->bad_at = sc->first_waiting = -1;
    int rc = 0;
    for (;;) {
        if (off == sent) sc->sent_found = true;
        if (off >= size) break;
        enum rec_check c = check_record(fd, off, size, &b, &r);
        if (c == REC_BAD) { /* damage: of the last append (cut) when only its own records follow */
            int64_t next = 0;
            if (!w.open) w = (struct walk){true, 0, off, sc->before + sc->from, 0, -1};
            if (w.damage_at < 0) w.damage_at = off;
            sc->torn = true;
            c = whole_record_after(fd, off, size, &b, &next, &r);
            if (c == REC_BAD) break; /* nothing whole after it */
            if (c == REC_WHOLE) {
                bool first = w.in_batch == 0 && w.batch == 0;
                if (first ? r.batch <= sc->last_batch : r.batch != w.batch) c = REC_BAD;
                w.batch = r.batch;
                off = next;
            }
        }
        if (c == REC_WHOLE && w.open && r.batch != w.batch) c = REC_BAD; /* another append follows */
        if (c == REC_BAD || (c == REC_WHOLE && w.damage_at >= 0 && (r.flags & LAST_OF_BATCH))) {
            snprintf(err, errlen, "the spool %s has %s at offset %lld, and whole records of a finished or a later "
                     "append follow it (at offset %lld): not repaired, nothing is sent from it; move the file aside "
                     "and keep it (its records are commands not yet sent)", path,
                     w.damage_at >= 0 ? "a corrupt record" : "an append that did not finish",
                     (long long)(w.damage_at >= 0 ? w.damage_at : w.batch_at), (long long)off);
            rc = CV_EREFUSED;
            break;
        }
        if (c == REC_IO) {
            snprintf(err, errlen, "cannot read the spool %s: %s", path, strerror(errno));
            rc = CV_EREFUSED;
            break;
        }
        if (!w.open) w = (struct walk){true, r.batch, off, sc->before + sc->from, 0, -1};
        w.in_batch++;
        if (r.batch > sc->last_batch) sc->last_batch = r.batch;
        if (off >= sent && sc->sent_found) {
            if (sc->first_waiting < 0) sc->first_waiting = off;
            sc->from++;
        } else {
            sc->before++;
        }
        if (r.flags & LAST_OF_BATCH) w.open = false;
        off += HEAD + (int64_t)r.len;
    }
    sc->end = off < size ? off : size;
    if (rc == 0 && w.open) { /* the last append did not finish: never confirmed, cut from its start */
        sc->bad_at = sc->end = w.batch_at;
        sc->cut_records = w.in_batch;
        long long keep = w.saved; /* the kept ones: before sent first, then from it */
        if (sc->before > keep) sc->before = keep;
        sc->from = keep - sc->before;
        if (sent > sc->end) sc->sent_found = false;
        if (sc->first_waiting >= sc->end) sc->first_waiting = -1;
    }
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
    for (size_t l = strlen(parent); l > 1 && parent[l - 1] == '/';) parent[--l] = '\0'; /* "a/b/" is "a/b" */
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

/* Copies the bytes of the log from off to size into DIR/spool.log.torn-<off>
 * (mode 0600; -<off>.N when that exists), fsync'd with its directory, naming it
 * in path. Returns 0, or CV_EREFUSED (errno set). */
static int keep_torn(struct spool *s, int64_t off, int64_t size, char *path, size_t pathlen) {
    int fd = -1;
    for (int i = 0; fd < 0 && i < 100; i++) {
        if (i == 0) snprintf(path, pathlen, "%s.torn-%lld", s->log_path, (long long)off);
        else snprintf(path, pathlen, "%s.torn-%lld.%d", s->log_path, (long long)off, i);
        fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0 && errno != EEXIST) return CV_EREFUSED;
    }
    if (fd < 0) return CV_EREFUSED;
    char chunk[65536];
    int rc = 0;
    for (int64_t at = off; rc == 0 && at < size;) {
        ssize_t r = read_at(s->log_fd, chunk, sizeof chunk, at);
        if (r <= 0) rc = CV_EREFUSED;
        else rc = write_at(fd, chunk, (size_t)r, at - off);
        at += r > 0 ? r : 0;
    }
    if (rc == 0 && fsync(fd) < 0) rc = CV_EREFUSED;
    int e = errno;
    close(fd);
    if (rc == 0) rc = sync_dir(s->dir);
    errno = e;
    return rc;
}

/* Cuts the unfinished last append that sc found (kept in a .torn- copy first),
 * warning with its bytes. Returns 0 or CV_EREFUSED with the reason in err. */
static int cut_tail(struct spool *s, int64_t size, const struct scan *sc, char *warn, size_t warnlen, char *err,
                    size_t errlen) {
    char copy[4200], lost[160], text[1024];
    if (keep_torn(s, sc->end, size, copy, sizeof copy) < 0) {
        snprintf(err, errlen, "cannot keep the torn end of the spool %s (%lld bytes at offset %lld) in %s: %s; "
                 "nothing is cut", s->log_path, (long long)(size - sc->end), (long long)sc->end, copy,
                 strerror(errno));
        return CV_EREFUSED;
    }
    if (ftruncate(s->log_fd, sc->end) < 0 || fsync(s->log_fd) < 0) {
        snprintf(err, errlen, "cannot cut the torn end of the spool %s: %s", s->log_path, strerror(errno));
        return CV_EREFUSED;
    }
    if (sc->cut_records == 0) snprintf(lost, sizeof lost, "that one command is lost");
    else snprintf(lost, sizeof lost, "its commands are lost: %lld whole record%s%s", sc->cut_records,
                  sc->cut_records == 1 ? "" : "s",
                  sc->torn ? " and a torn or corrupt part" : " without the last one of the append");
    snprintf(text, sizeof text, "the spool %s ended in an append that did not finish (cut short by a crash or a "
             "power loss before it was confirmed): dropped its %lld bytes at offset %lld, kept in %s; %s, the %lld "
             "before it are kept", s->log_path, (long long)(size - sc->end), (long long)sc->end, copy, lost,
             sc->before + sc->from);
    log_warn("%s", text);
    if (warn) snprintf(warn, warnlen, "%s", text);
    return 0;
}

/* The repairs of spool_open after its scan: an unfinished last append cut off
 * (warned), a marker that is not at a record reset to 0 (everything sent again:
 * the same ids), an empty log truncated. Returns 0 or CV_EREFUSED with the
 * reason in err. */
static int settle(struct spool *s, int64_t size, int64_t marker, const struct scan *sc, char *warn, size_t warnlen,
                  char *err, size_t errlen) {
    if (sc->bad_at >= 0 && cut_tail(s, size, sc, warn, warnlen, err, errlen) < 0) return CV_EREFUSED;
    s->size = sc->end;
    s->batch = sc->last_batch + 1;
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
    s->pid = getpid();
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

/* Refuses a process other than the one that opened s (a fork's child: the
 * lock is its parent's). Returns 0 or CV_EREFUSED with the reason in err. */
static int check_owner(const struct spool *s, char *err, size_t errlen) {
    if (getpid() == s->pid) return 0;
    snprintf(err, errlen, "the spool %s was opened by process %ld, not by this one (%ld, a fork of it?): the lock "
             "is the opener's; a child process opens a spool of its own, in another directory", s->dir,
             (long)s->pid, (long)getpid());
    return CV_EREFUSED;
}

/* Writes the k records of bodies as batch number batch at s->size, the last
 * one flagged, gathering headers and small bodies in STAGE_BYTES (a large body
 * is written from where it is). Returns 0, or CV_EREFUSED (errno set). */
static int write_batch(struct spool *s, uint64_t batch, const char *const *bodies, const size_t *lens, int k) {
    unsigned char *stage = malloc(STAGE_BYTES);
    if (!stage) {
        errno = ENOMEM;
        return CV_EREFUSED;
    }
    size_t used = 0;
    int64_t at = s->size;
    int rc = 0;
    for (int i = 0; rc == 0 && i < k; i++) {
        struct rec r = {(uint32_t)lens[i], batch, i == k - 1 ? LAST_OF_BATCH : 0};
        if (used + HEAD > STAGE_BYTES) {
            rc = write_at(s->log_fd, stage, used, at);
            at += (int64_t)used;
            used = 0;
        }
        record_head(&r, bodies[i], stage + used);
        used += HEAD;
        if (used + lens[i] <= STAGE_BYTES) {
            memcpy(stage + used, bodies[i], lens[i]);
            used += lens[i];
            continue;
        }
        if (rc == 0) rc = write_at(s->log_fd, stage, used, at);
        at += (int64_t)used;
        used = 0;
        if (rc == 0) rc = write_at(s->log_fd, bodies[i], lens[i], at);
        at += (int64_t)lens[i];
    }
    if (rc == 0 && used > 0) rc = write_at(s->log_fd, stage, used, at);
    free(stage);
    return rc;
}

int spool_append(struct spool *s, const char *const *bodies, const size_t *lens, int n, int *appended, char *err,
                 size_t errlen) {
    *appended = 0;
    if (check_owner(s, err, errlen) < 0) return CV_EREFUSED;
    int64_t total = 0;
    int k = 0;
    while (k < n && lens[k] <= (size_t)BODY_MAX &&
           s->size + total + HEAD + (int64_t)lens[k] <= (int64_t)s->max_bytes) {
        total += HEAD + (int64_t)lens[k];
        k++;
    }
    if (k > 0) {
        if (write_batch(s, s->batch, bodies, lens, k) < 0 || fdatasync(s->log_fd) < 0) {
            int e = errno;
            if (ftruncate(s->log_fd, s->size) == 0) (void)fdatasync(s->log_fd); /* back to where it was */
            snprintf(err, errlen, "cannot write the spool %s: %s", s->log_path, strerror(e));
            return CV_EREFUSED;
        }
        s->batch++;
        s->size += total;
        s->waiting += k;
        *appended = k;
    }
    if (k == n) return 0;
    if (lens[k] > (size_t)BODY_MAX || (int64_t)lens[k] + HEAD > (int64_t)s->max_bytes)
        snprintf(err, errlen, "the command is %zu bytes, more than the spool %s can ever hold (at most %lld bytes, "
                 "producer.spool_max_bytes, with a %d-byte record header): it and the %d after it are not spooled",
                 lens[k], s->dir, s->max_bytes, HEAD, n - k - 1);
    else
        snprintf(err, errlen, "the spool %s is full: %lld bytes of at most %lld (producer.spool_max_bytes) hold "
                 "%lld commands not yet sent; %d more not spooled (send what waits with conveyor-produce --spool %s "
                 "--flush once the broker is back)", s->dir, (long long)s->size, s->max_bytes, s->waiting, n - k,
                 s->dir);
    return CV_EFULL;
}

int spool_read(struct spool *s, struct spool_record *recs, int max, char *err, size_t errlen) {
    if (check_owner(s, err, errlen) < 0) return CV_EREFUSED;
    int n = 0;
    int64_t off = s->sent;
    struct buf b = {0};
    struct rec r;
    while (n < max && off < s->size) {
        enum rec_check c = check_record(s->log_fd, off, s->size, &b, &r);
        if (c != REC_WHOLE) {
            if (c == REC_IO) snprintf(err, errlen, "cannot read the spool %s: %s", s->log_path, strerror(errno));
            else snprintf(err, errlen, "the spool %s changed under its lock: the record at offset %lld is corrupt "
                          "now", s->log_path, (long long)off);
            spool_records_free(recs, n);
            free(b.p);
            return CV_EREFUSED;
        }
        recs[n] = (struct spool_record){b.p, r.len, off, off + HEAD + (int64_t)r.len};
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
    if (check_owner(s, err, errlen) < 0) return CV_EREFUSED;
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
    struct stat ds;
    int e = stat(dir, &ds) < 0 ? errno : S_ISDIR(ds.st_mode) ? 0 : ENOTDIR;
    if (e) { /* a mistyped directory is no empty spool */
        snprintf(err, errlen, "cannot read the spool directory %s: %s", dir, strerror(e));
        return CV_EREFUSED;
    }
    int log_fd = open_in(dir, "spool.log", O_RDONLY, NULL);
    if (log_fd < 0) {
        if (errno == ENOENT) return 0; /* a directory without a spool yet: nothing waits */
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
        struct rec r;
        if (first >= 0 && check_record(log_fd, first, sc.end, &b, &r) == REC_WHOLE) created_at(b.p, st->oldest);
        free(b.p);
    }
    close(log_fd);
    return rc;
}
