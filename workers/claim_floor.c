/* claim_floor.c - where a claim of an outbox starts (Conveyor's outbox by the
 * relay, a producer's conveyor.outbound by the forwarder), and why rows of one
 * aggregate go out in commit order. Both tables take ids after the transaction
 * id, one at a time (sql/0004, sql/producer/0001).
 *
 * Order. Two commands on one aggregate are serialised by its row lock: the
 * later transaction takes its outbox ids after the earlier one committed, so
 * its ids are higher, and any snapshot that sees it committed sees the
 * earlier one too. A claim that takes the unpublished rows in id order from
 * below every unpublished row therefore never publishes the later events
 * before the earlier ones, however long the earlier commit took.
 *
 * The floor. Published rows leave dead entries at the low end of the
 * outbox_unpublished index until VACUUM; a claim from the lowest id would
 * walk all of them. So a claim starts above a floor, and the floor may be any
 * id F such that every row with an id at or below F that will ever be
 * committed is already marked published. A transaction can hold an id for as
 * long as it likes before it commits, so the floor cannot follow what was
 * published; it follows what can no longer appear:
 *   - a claim reads L, the last id the outbox sequence handed out (under the
 *     sequence's lock: pg_sequence_last_value; see relay_drain);
 *   - the mark that follows has a transaction id S, assigned after L was read.
 *     Every transaction holding an id <= L had its transaction id before it
 *     took that id (sql/0004: the id's default assigns it first), so before
 *     L was read: below S;
 *   - once a claim's snapshot has xmin >= S, none of those is in progress:
 *     that claim sees every row <= L that will ever exist. When it also
 *     reaches L (fewer rows than the batch, or its last id >= L) and its mark
 *     succeeds, every row <= L is marked: the floor becomes L.
 * (L, S) is the pending candidate; the next is taken by the mark after it was
 * promoted. A stalled commit only holds the floor where it is (claims walk
 * more dead entries until it ends); it delays no other row. Snapshot xmax is
 * no substitute for S: it is one past the newest *completed* transaction, and
 * a transaction in progress can already hold it.
 *
 * No belt. There is no periodic claim from the lowest id: the argument above
 * holds for every row whose id comes from the column's default, and
 * test_relay's test_out_of_order_commits_... forces what it is about (ids
 * taken, commits stalled at random, later ids published and the floor moved
 * past, thousands of times a run) and finds nothing left below the floor
 * (docs/decisions.md, "The relay claims above a floor"). The claims that
 * start from the lowest id are only the first one of every relay that becomes
 * active (its floor starts at 0) and the first one of the stopping relay's
 * drain; that one counts and logs (a warning) any row it finds at or below
 * the floor, so a hole in the argument would show in the log. What the
 * argument does not cover, and nothing in the relay can: an id set by hand,
 * and a sequence set back (setval, ALTER SEQUENCE ... RESTART, TRUNCATE ...
 * RESTART IDENTITY) under a relay that stays active. */
#include "workers.h"

/* Called after a claim from f->floor whose rows (n, the last of them last)
 * are all marked published: promotes the candidate if that claim covered it,
 * then takes a new candidate (h.last_id, mark_xid) if there is none (mark_xid
 * 0: no mark, no new candidate). */
void claim_floor_advance(struct claim_floor *f, struct claim_horizon h, int n, int batch, int64_t last,
                         uint64_t mark_xid) {
    if (f->pending_id && h.xmin >= f->pending_xid && (n < batch || last >= f->pending_id)) {
        if (f->pending_id > f->floor) {
            f->floor = f->pending_id;
            f->moves++;
        }
        f->pending_id = 0;
    }
    if (!f->pending_id && mark_xid) {
        f->pending_id = h.last_id;
        f->pending_xid = mark_xid;
    }
}

