/*
 * spool.h - the C client's offline spool (conveyor_set_spool; conveyor-produce
 * --spool DIR): the commands a broker could not take, kept in order in a file
 * of checksummed records until they are sent. Internal to producer/ (client.c);
 * the format and its bounds are in docs/decisions.md, "The offline spool".
 *
 * DIR/spool.log   records: "CVS2", u32 length, u64 batch (the append's
 *                 number), u32 flags (1: the last record of its append), all
 *                 LE, 16-byte BLAKE2b of (length, batch, flags, body), body (the
 *                 envelope as it will be sent)
 * DIR/spool.log.torn-OFFSET  the bytes an open cut off (an append that did not finish)
 * DIR/spool.sent  16 bytes: u64 offset (LE) and its complement: the records
 *                 before the offset were confirmed by the broker
 * DIR/spool.lock  flock'd by the one writer; holds its pid
 *
 * Functions return 0, a count, or a negative CV_E* class (CV_EFULL: the spool
 * is full; CV_EREFUSED: locked by another process, corrupt, or not writable),
 * with the reason in err. Not thread-safe, like the client.
 */
#ifndef CONVEYOR_SPOOL_H
#define CONVEYOR_SPOOL_H

#include <stddef.h>
#include <stdint.h>

struct spool;

/* One waiting record, as spool_read hands it out. */
struct spool_record {
    char *body;     /* the envelope, NUL-terminated; malloc'd (spool_records_free) */
    size_t len;
    int64_t at;     /* its offset in spool.log */
    int64_t end;    /* the offset after it: what spool_mark_sent takes */
};

/* What a spool holds (spool_status). */
struct spool_status {
    long long records;      /* records waiting (not yet confirmed sent) */
    long long bytes;        /* the size of spool.log (sent records included until it empties) */
    long long sent_offset;  /* records before it were confirmed sent */
    long long torn_bytes;   /* bytes after the last whole record (an append cut short, or under way) */
    char oldest[40];        /* createdAt of the first waiting record; "" when none waits */
};

/* Opens the spool in dir (created, mode 0700, when missing), locks it against
 * a second writer (flock on DIR/spool.lock, LOCK_NB), and checks every record:
 * an append that did not finish (its last record missing: torn, corrupt or
 * zeroed records, possibly whole ones of that append after them) at the end is
 * cut off from its first record (the bytes copied to DIR/spool.log.torn-OFFSET
 * first, then the file truncated and fsync'd, log_warn naming the bytes, and
 * the same text in warn when warn is not NULL: warn[0] stays '\0' otherwise).
 * Returns 0 with *out (spool_close it), or CV_EREFUSED with the reason in err:
 * locked by another process (its pid named), damage followed by whole records
 * of a finished or a later append (its offset named: the file is kept as it
 * is), a file that cannot be created, read or written. Only the process that
 * opened it may use it (a fork's child is refused: CV_EREFUSED). */
int spool_open(const char *dir, long long max_bytes, struct spool **out, char *warn, size_t warnlen, char *err,
               size_t errlen);
/* Closes the files (the lock goes with them) and frees s; NULL is fine. */
void spool_close(struct spool *s);
/* The records waiting in s (appended, not yet marked sent); 0 for NULL. */
long long spool_waiting(const struct spool *s);
/* The directory of s (owned by s). */
const char *spool_dir(const struct spool *s);
/* Appends bodies[0..n) (lens[i] bytes each) in order as one write, then
 * fdatasync: durable when it returns. Appends as many as fit under the bound,
 * in order (none after the first that does not fit). Returns 0 with *appended
 * = n; CV_EFULL with *appended < n (the others appended and durable) and the
 * bound named in err (or the size of a command larger than the bound); or
 * CV_EREFUSED when the file cannot be written (ENOSPC, EIO: the file is cut
 * back to where it was, *appended = 0). The records are one append (batch):
 * the last one flagged. */
int spool_append(struct spool *s, const char *const *bodies, const size_t *lens, int n, int *appended, char *err,
                 size_t errlen);
/* The first up to max waiting records, in order, into recs. Returns how many
 * (0: none waits), or CV_EREFUSED when the file cannot be read; the caller
 * frees them with spool_records_free. */
int spool_read(struct spool *s, struct spool_record *recs, int max, char *err, size_t errlen);
/* Frees the bodies of recs[0..n). */
void spool_records_free(struct spool_record *recs, int n);
/* Records up to end (the end of a record spool_read gave, nrecords of them
 * from the first waiting one) were confirmed by the broker: the marker moves
 * there (fdatasync'd); when nothing waits any more the log is truncated to
 * empty, then the marker set to 0. Returns 0 or CV_EREFUSED. */
int spool_mark_sent(struct spool *s, int64_t end, long long nrecords, char *err, size_t errlen);
/* What the spool in dir holds, read without its lock and without changing it
 * (a writer may be appending: an incomplete tail is counted in torn_bytes).
 * A directory without a spool holds nothing (0). Returns 0, or CV_EREFUSED
 * with the reason in err (a missing directory, a corrupt record followed by
 * whole ones of a finished append, a read error). */
int spool_status(const char *dir, struct spool_status *st, char *err, size_t errlen);

#endif
