"""The offline spool (issue 26, part 2): conveyor-produce --spool DIR and the C
API's spool (conveyor_set_spool, conveyor_flush, conveyor_spooled,
conveyor_spool_status). With the broker down, commands are appended to a local
file, fsync'd, and sent in order once it is back; a producer killed -9 loses
nothing it spooled; a full spool, a locked one, a corrupt one are refused with a
clear message and exit 7; an append a crash cut short (a torn last record, or
damage followed by whole records of that append) is cut whole, kept aside in
spool.log.torn-OFFSET, and said so; a forked child is refused;
an invalid command and a full queue are never spooled (README, "The offline
spool"; docs/decisions.md, "The offline spool")."""
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error

import pika
import redis as redislib

from harness import (AMQP_URL, BIN, REDIS_URL, ROOT, TRANSPORT, Pool, check, envelope, eq, free_port, log_file,
                     new_id, query, rabbitmqctl, run_bin, write_config)
from test_bounded_queues import empty as purge
from test_bounded_queues import management, setup_with

N = 2000
EXIT_INVALID, EXIT_FULL, EXIT_SPOOL = 5, 6, 7  # conveyor-produce --help
HEAD = 36  # a record's magic, length, batch, flags and checksum (docs/decisions.md)


def idle_config(extra="", queue_opts=""):
    """A queues.conf with no worker: nothing takes the commands off their queue."""
    return write_config(workers={"users": 0, "catalog": 0, "orders": 0}, extra=extra, queue_opts=queue_opts)


def down_env():
    """An environment whose broker cannot be reached (its URL on a port nothing listens on)."""
    port = free_port()
    if TRANSPORT == "rabbitmq":
        return {"CONVEYOR_RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{port}"}
    return {"CONVEYOR_REDIS_URL": f"redis://127.0.0.1:{port}/0"}


def produce(config, *args, env=None, input_=None):
    return run_bin("conveyor-produce", "-c", config, *args, env=env, input_=input_, timeout=180)


def status(d):
    r = run_bin("conveyor-produce", "--spool", d, "--status")
    eq(r.returncode, 0, f"--status: {r.stderr}")
    return json.loads(r.stdout)


def product(tag, pid=None):
    return envelope("createProduct", {"name": f"spool {tag}", "price": "1.00", "stock": 1,
                                      "productId": pid or new_id()})


def lines_of(envs):
    return "".join(json.dumps(e) + "\n" for e in envs)


def queued_ids(queue="catalog"):
    """The command ids in queue, in the order a worker would take them, left on the queue."""
    if TRANSPORT == "rabbitmq":
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        ch = conn.channel()
        n = ch.queue_declare(f"conveyor.{queue}", passive=True).method.message_count
        ch.basic_qos(prefetch_count=min(max(n, 1), 65535))  # a quorum queue gives 2,000 unacked without one
        out = []
        for method, _, body in ch.consume(f"conveyor.{queue}", auto_ack=False, inactivity_timeout=10):
            if method is None or len(out) == n:
                break
            out.append(json.loads(body)["id"])
            if len(out) == n:
                break
        conn.close()  # unacked: back on the queue
        return out
    raw = redislib.Redis.from_url(REDIS_URL).lrange(f"conveyor:queue:{queue}", 0, -1)
    return [json.loads(b)["id"] for b in reversed(raw)]  # LPUSH: the oldest is last


def same_order(got, want, what):
    """got == want, or a failure naming the first place they differ (not two long lists)."""
    at = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
    check(got == want, f"{what}: {len(got)} ids, {len(want)} wanted; the first difference at {at}: "
                       f"{got[at:at + 3]} for {want[at:at + 3]} (wanted at {[want.index(g) for g in got[at:at + 3] if g in want]})")


def first_copies(ids):
    seen, out = set(), []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def stop_broker():
    if TRANSPORT == "rabbitmq":
        rabbitmqctl("stop_app")
    else:
        pid = int(redislib.Redis.from_url(REDIS_URL).info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)  # a crash: the AOF keeps what it acknowledged
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                redislib.Redis.from_url(REDIS_URL).ping()
                time.sleep(0.1)
            except redislib.exceptions.ConnectionError:
                return
        raise AssertionError("redis still answers after SIGKILL")


def start_broker():
    if TRANSPORT == "rabbitmq":
        rabbitmqctl("start_app")
    else:
        subprocess.run([os.path.join(ROOT, "scripts", "servers.sh"), "up"], check=True, capture_output=True,
                       timeout=300)
    deadline = time.time() + 60
    while True:
        try:
            if TRANSPORT == "rabbitmq":
                pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
            else:
                redislib.Redis.from_url(REDIS_URL).ping()
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def records(path, full=False):
    """(offset, size) of each whole record of a spool.log (docs/decisions.md's
    format); with full, (offset, size, batch, flags)."""
    data = open(path, "rb").read()
    out, off = [], 0
    while off + HEAD <= len(data) and data[off:off + 4] == b"CVS2":
        n, batch, flags = struct.unpack_from("<IQI", data, off + 4)
        if off + HEAD + n > len(data):
            break
        out.append((off, HEAD + n, batch, flags) if full else (off, HEAD + n))
        off += HEAD + n
    return out


def record_bytes(body, batch, last):
    """One spool record, as the client writes it (docs/decisions.md's format)."""
    fields = struct.pack("<IQI", len(body), batch, 1 if last else 0)
    return b"CVS2" + fields + hashlib.blake2b(fields + body, digest_size=16).digest() + body


def wait_applied(ids, timeout=180):
    """Waits until every id has its processed_commands row; returns {outcome: count}."""
    deadline = time.time() + timeout
    while True:
        got = dict(query("SELECT outcome, count(*) FROM processed_commands WHERE id = ANY(%s::uuid[]) "
                         "GROUP BY outcome", list(ids)))
        if sum(got.values()) == len(ids) or time.time() > deadline:
            return got
        time.sleep(0.3)


def kill_halfway(config, d, envs):
    """conveyor-produce --spool d fed envs on stdin a few lines at a time, killed -9
    once it has printed the ids of half of them. Returns the ids it printed."""
    log = log_file("conveyor-produce-killed-")
    p = subprocess.Popen([os.path.join(BIN, "conveyor-produce"), "-c", config, "--spool", d],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    text = [json.dumps(e) for e in envs]

    def feed():
        try:
            for i in range(0, len(text), 10):
                p.stdin.write("\n".join(text[i:i + 10]) + "\n")
                p.stdin.flush()
                time.sleep(0.01)
            p.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    printed = []
    while len(printed) < len(envs) // 2:
        line = p.stdout.readline()
        if not line:
            break
        printed.append(line.strip())
    p.kill()
    p.wait()
    t.join(10)
    check(len(printed) >= len(envs) // 2, f"the producer printed {len(printed)} ids before its kill")
    check(len(printed) < len(envs), "killed halfway, not at the end")
    eq(printed, [e["id"] for e in envs[:len(printed)]], "the ids printed, in order")
    return printed


def test_two_thousand_commands_through_a_down_broker_and_a_kill():  # faults (Release only: the other spool cases run the same code under ASan)
    """2,000 createProduct with the broker down, the producer killed -9 halfway and
    started again; the broker back: the next start sends them in the order they
    were spooled (then its own command), and each is applied once."""
    purge()
    config = idle_config()
    d = tempfile.mkdtemp(prefix="conveyor-spool-")
    envs = [product(i) for i in range(N)]
    last = product("last")
    stopped = False
    try:
        stop_broker()
        stopped = True
        printed = kill_halfway(config, d, envs)
        st = status(d)
        check(st["records"] >= len(printed), f"every id printed is spooled after the kill: {st} < {len(printed)}")
        eq(st["oldestCreatedAt"], envs[0]["createdAt"], "the oldest waiting")
        # the next start: what it did not confirm is given again, with the same ids
        r = produce(config, "--spool", d, input_=lines_of(envs[len(printed):]))
        eq(r.returncode, 0, f"the second run spools the rest: {r.stderr}")
        eq(r.stdout.split(), [e["id"] for e in envs[len(printed):]], "the second run's ids")
        check("spooled in" in r.stderr and "wait" in r.stderr, f"it says the commands went to the spool: {r.stderr}")
        spooled = status(d)["records"]
        check(spooled >= N, f"all {N} wait: {spooled}")
        print(f"FIGURES spool: killed after {len(printed)} ids printed; {spooled} records for {N} commands")
        start_broker()
        stopped = False
        # a later start with one more command: what waits goes first, in order, then it
        r = produce(config, "--spool", d, "createProduct", json.dumps(last["payload"]))
        eq(r.returncode, 0, f"the next start sends what waits: {r.stderr}")
        eq(status(d), {"dir": d, "records": 0, "bytes": 0, "oldestCreatedAt": None}, "the spool is empty")
        queued = queued_ids()
        eq(len(queued), spooled + 1, "each spooled record sent once, and the new command")
        same_order(first_copies(queued[:-1]), [e["id"] for e in envs], "sent in the order they were spooled")
        eq(queued[-1], r.stdout.strip(), "the new command behind them")
        with Pool(workers={"users": 0, "catalog": 2, "orders": 0}) as pool:
            got = wait_applied([e["id"] for e in envs] + [queued[-1]])
            eq(got, {"applied": N + 1}, "every spooled command applied, and the new one")
            eq(pool.stop(), (0, []), "clean stop")
        pids = [e["payload"]["productId"] for e in envs]
        eq(query("SELECT count(*) FROM products WHERE id = ANY(%s::uuid[])", pids)[0][0], N, "each product once")
    finally:
        if stopped:
            start_broker()
        shutil.rmtree(d, ignore_errors=True)
        os.unlink(config)


def test_a_full_or_locked_spool_is_refused():
    """A spool at its bound refuses (exit 7, the bound named) and keeps what it
    holds; a second writer on the same directory is refused, naming the holder;
    --status reads it meanwhile."""
    config = idle_config(extra="producer: { spool_max_bytes = 4096; };")
    d = tempfile.mkdtemp(prefix="conveyor-spool-")
    down = down_env()
    envs = [product(i) for i in range(40)]
    hold = None
    try:
        r = produce(config, "--spool", d, input_=lines_of(envs), env=down)
        eq(r.returncode, EXIT_SPOOL, f"a full spool: {r.stderr}")
        ids = r.stdout.split()
        check(0 < len(ids) < 40, f"some fit: {len(ids)}")
        eq(ids, [e["id"] for e in envs[:len(ids)]], "those that fit, in order")
        check(f"the spool {d} is full" in r.stderr and "4096" in r.stderr and "producer.spool_max_bytes" in r.stderr,
              f"the message names the spool and its bound: {r.stderr}")
        check(f"stdin lines {len(ids) + 1}-40 neither sent nor spooled" in r.stderr, f"names the lines: {r.stderr}")
        st = status(d)
        eq(st["records"], len(ids), "what fit waits")
        check(st["bytes"] <= 4096, f"within the bound: {st}")
        r = produce(config, "--spool", d, "createProduct", json.dumps({"name": "one more", "price": 1}), env=down)
        eq(r.returncode, EXIT_SPOOL, f"one more: {r.stderr}")
        check("is full" in r.stderr, r.stderr)
        eq(r.stdout, "", "no id for a command not spooled")
        big = json.dumps({"name": "~" * 5000, "price": 1})  # not "x": a published password is a run of x
        d2 = tempfile.mkdtemp(prefix="conveyor-spool-")
        r = produce(config, "--spool", d2, "createProduct", big, env=down)
        shutil.rmtree(d2, ignore_errors=True)
        eq(r.returncode, EXIT_SPOOL, f"a command larger than the bound: {r.stderr}")
        check("more than the spool" in r.stderr and "can ever hold (at most 4096 bytes" in r.stderr
              and "is full" not in r.stderr, f"says so, not 'full': {r.stderr}")

        hold = subprocess.Popen([os.path.join(BIN, "conveyor-produce"), "-c", config, "--spool", d],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, **down}, cwd=ROOT)
        deadline = time.time() + 20
        while open(os.path.join(d, "spool.lock")).read().strip() != str(hold.pid):
            check(time.time() < deadline and hold.poll() is None, "the first producer holds the spool")
            time.sleep(0.05)
        r = produce(config, "--spool", d, "createProduct", json.dumps({"name": "second", "price": 1}), env=down)
        eq(r.returncode, EXIT_SPOOL, f"a second writer: {r.stderr}")
        check(f"the spool {d} is locked by another process (pid {hold.pid})" in r.stderr, r.stderr)
        eq(status(d)["records"], len(ids), "--status reads a locked spool")
        hold.stdin.close()
        eq(hold.wait(30), 0, "the holder ends")
        hold = None
    finally:
        if hold:
            hold.kill()
            hold.wait()
        shutil.rmtree(d, ignore_errors=True)
        os.unlink(config)


def test_a_torn_or_corrupt_spool_loses_at_most_its_last_record():
    """The last record cut in half (a power loss mid-append) or with a byte
    flipped: dropped, said so with its bytes, the others sent; a corrupt record
    in the middle: refused naming its offset, the file kept as it was."""
    config = idle_config()
    down = down_env()
    dirs = []

    def spool_of(n):  # two appends: n - 1 commands, then one
        d = tempfile.mkdtemp(prefix="conveyor-spool-")
        dirs.append(d)
        envs = [product(i) for i in range(n)]
        ids = []
        for part in (envs[:-1], envs[-1:]):
            r = produce(config, "--spool", d, input_=lines_of(part), env=down)
            eq(r.returncode, 0, f"spooled: {r.stderr}")
            ids += r.stdout.split()
        return d, os.path.join(d, "spool.log"), ids

    def flip(path, at):
        data = bytearray(open(path, "rb").read())
        data[at] ^= 0x20
        open(path, "wb").write(data)

    try:
        for damage in ("cut", "flip"):
            purge()
            d, log, ids = spool_of(5)
            recs = records(log)
            eq(len(recs), 5, "five records")
            off, size = recs[-1]
            if damage == "cut":
                os.truncate(log, off + size // 2)
                lost = size - size // 2
            else:
                flip(log, off + HEAD + size // 3)  # in its body
                lost = size
            eq(status(d)["records"], 4, f"{damage}: --status counts the whole ones")
            r = produce(config, "--spool", d, "--flush")
            eq(r.returncode, 0, f"{damage}: --flush: {r.stderr}")
            check(f"dropped its {lost} bytes at offset {off}, kept in {log}.torn-{off}" in r.stderr
                  and "that one command is lost" in r.stderr, f"{damage}: says what it dropped: {r.stderr}")
            check("4 spooled commands sent" in r.stderr, r.stderr)
            eq(queued_ids(), ids[:4], f"{damage}: the four before it sent, in order")
            eq(status(d)["records"], 0, "none waits")

        d, log, ids = spool_of(5)
        off, size = records(log)[2]
        flip(log, off + HEAD + 5)
        before = open(log, "rb").read()
        r = produce(config, "--spool", d, "--flush")
        eq(r.returncode, EXIT_SPOOL, f"a corrupt record in the middle: {r.stderr}")
        check(f"corrupt record at offset {off}" in r.stderr and "not repaired" in r.stderr, r.stderr)
        eq(open(log, "rb").read(), before, "the file is kept as it was")
        r = run_bin("conveyor-produce", "--spool", d, "--status")
        eq(r.returncode, EXIT_SPOOL, f"--status says so too: {r.stderr}")
    finally:
        purge()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        os.unlink(config)


def test_an_append_that_did_not_finish_is_cut_whole_and_kept_aside():
    """A power loss mid-append may leave zeros or garbage followed by whole
    records of that same append (pages written back out of order): the append,
    never confirmed (its last record missing), is cut from its first record, the
    bytes kept in spool.log.torn-OFFSET (mode 0600), the appends before it sent;
    damage followed by a finished append is refused as before."""
    config = idle_config()
    down = down_env()
    dirs = []

    def two_appends():  # two commands, then three: records 0-1 and 2-4
        d = tempfile.mkdtemp(prefix="conveyor-spool-")
        dirs.append(d)
        ids = []
        for k in (2, 3):
            r = produce(config, "--spool", d, input_=lines_of([product(i) for i in range(k)]), env=down)
            eq(r.returncode, 0, f"spooled: {r.stderr}")
            ids += r.stdout.split()
        log = os.path.join(d, "spool.log")
        recs = records(log, full=True)
        eq([(b, f) for _, _, b, f in recs], [(1, 0), (1, 1), (2, 0), (2, 0), (2, 1)],
           "two appends, each one's last record flagged")
        return d, log, ids, recs

    def zero(path, off, size):
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(b"\0" * size)

    try:
        for damage in ("middle zeroed", "last missing", "hand-built"):
            purge()
            d, log, ids, recs = two_appends()
            cut_at = recs[2][0]
            if damage == "middle zeroed":  # zeros, then a whole record of the same append: no last one
                zero(log, recs[3][0], recs[3][1])
                with open(log, "r+b") as f:
                    f.truncate(recs[4][0] + recs[4][1] // 2)
                said = "its commands are lost: 1 whole record and a torn or corrupt part"
            elif damage == "last missing":  # whole records of the append, its last one never written
                os.truncate(log, recs[4][0])
                said = "its commands are lost: 2 whole records without the last one of the append"
            else:  # a file written by hand: garbage between whole records of an unfinished append
                data = open(log, "rb").read()[:cut_at]
                body = json.dumps(product("x")).encode()
                data += record_bytes(body, 2, False) + os.urandom(50) + record_bytes(body, 2, False)
                open(log, "wb").write(data)
                said = "its commands are lost: 2 whole records and a torn or corrupt part"
            before = open(log, "rb").read()
            eq(status(d)["records"], 2, f"{damage}: --status counts the finished append only")
            r = produce(config, "--spool", d, "--flush")
            eq(r.returncode, 0, f"{damage}: --flush: {r.stderr}")
            torn = f"{log}.torn-{cut_at}"
            check(f"dropped its {len(before) - cut_at} bytes at offset {cut_at}, kept in {torn}" in r.stderr
                  and said in r.stderr and "the 2 before it are kept" in r.stderr, f"{damage}: {r.stderr}")
            eq(open(torn, "rb").read(), before[cut_at:], f"{damage}: the cut bytes kept")
            eq(os.stat(torn).st_mode & 0o777, 0o600, "kept mode 0600")
            check("2 spooled commands sent" in r.stderr, r.stderr)
            eq(queued_ids(), ids[:2], f"{damage}: the finished append sent, in order")

        d, log, ids, recs = two_appends()  # damage in an append whose last record is whole: refused
        zero(log, recs[2][0], recs[2][1])
        before = open(log, "rb").read()
        r = produce(config, "--spool", d, "--flush")
        eq(r.returncode, EXIT_SPOOL, f"damage then a finished append: {r.stderr}")
        check(f"corrupt record at offset {recs[2][0]}" in r.stderr and "not repaired" in r.stderr, r.stderr)
        eq(open(log, "rb").read(), before, "the file is kept as it was")

        r = run_bin("conveyor-produce", "--spool", os.path.join(d, "no-such-dir"), "--status")
        eq(r.returncode, EXIT_SPOOL, f"--status of a missing directory: {r.stderr}")
        check("cannot read the spool directory" in r.stderr, r.stderr)
    finally:
        purge()
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
        os.unlink(config)


FORK_PROGRAM = r"""
    pid_t pid = fork();
    if (pid == 0) { /* the child: the parent's spool (and lock) is not its own */
        int rc = conveyor_publish(c, "createProduct", "{\"name\":\"fork\",\"price\":\"1.00\"}", NULL, id);
        printf("child %d %s\n", rc, conveyor_error(c));
        fflush(stdout);
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    int rc = conveyor_publish(c, "createProduct", "{\"name\":\"parent\",\"price\":\"1.00\"}", NULL, id);
    printf("parent %d %lld\n", rc, conveyor_spooled(c));
"""


C_MAIN = r"""#include <conveyor.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char err[512], id[37];
    (void)argc;
    conveyor_client *c = conveyor_open(argv[1], 0, err, sizeof err, NULL);
    if (!c || conveyor_set_spool(c, argv[2], 0) < 0) return 2;
%s
    conveyor_close(c);
    return 0;
}
"""


def c_program(tmp, body):
    """A program of C_MAIN around body (argv: a config, a spool directory), built against the build tree's
    libconveyor (with its sanitizers) in tmp: its path."""
    source = C_MAIN % body
    needed = subprocess.run(["readelf", "-d", os.path.join(BIN, "libconveyor.so")], capture_output=True,
                            text=True).stdout
    san = ["-fsanitize=address,undefined"] if "libasan" in needed else []
    src, prog = os.path.join(tmp, "prog.c"), os.path.join(tmp, "prog")
    open(src, "w").write(source)
    r = subprocess.run(["cc", *san, "-I", os.path.join(ROOT, "producer"), src, "-L", BIN, "-lconveyor",
                        f"-Wl,-rpath,{BIN}", "-o", prog], capture_output=True, text=True)
    eq(r.returncode, 0, f"the program builds: {r.stderr}")
    return prog


def test_a_forked_child_cannot_use_its_parents_spool():
    """fork() shares the spool's lock: the child's publish is refused
    (CONVEYOR_ESPOOL, saying why), the parent's is spooled."""
    config = idle_config()
    d = tempfile.mkdtemp(prefix="conveyor-spool-")
    tmp = tempfile.mkdtemp(prefix="conveyor-fork-")
    try:
        prog = c_program(tmp, FORK_PROGRAM)
        r = subprocess.run([prog, config, d], capture_output=True, text=True, timeout=120,
                           env={**os.environ, **down_env()}, cwd=ROOT)
        eq(r.returncode, 0, f"the fork program: {r.stdout} {r.stderr}")
        lines = r.stdout.splitlines()
        child = [x for x in lines if x.startswith("child ")]
        check(len(child) == 1 and child[0].startswith("child -6 ") and "a fork of it?" in child[0], r.stdout)
        check("parent 0 1" in lines, f"the parent spools: {r.stdout}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.unlink(config)


MARKER_PROGRAM = r"""
    int rc = conveyor_flush(c);
    printf("flush %d %lld %s\n", rc, conveyor_spooled(c), conveyor_error(c));
    rc = conveyor_publish(c, "createProduct", "{\"name\":\"after\",\"price\":\"1.00\"}", NULL, id);
    printf("publish %d %lld %s\n", rc, conveyor_spooled(c), id);
"""


def test_a_marker_that_cannot_be_written_after_the_flush_leaves_the_spool_usable():
    """Everything sent, the log truncated, then the marker's write fails
    (spool.sent on /dev/full: ENOSPC): the flush says so (CONVEYOR_ESPOOL), and
    the client knows its log is empty: the next publish is sent, not refused."""
    purge()
    config = idle_config()
    d = tempfile.mkdtemp(prefix="conveyor-spool-")
    tmp = tempfile.mkdtemp(prefix="conveyor-marker-")
    try:
        r = produce(config, "--spool", d, input_=lines_of([product(i) for i in range(3)]), env=down_env())
        eq(r.returncode, 0, f"spooled: {r.stderr}")
        spooled = r.stdout.split()
        os.unlink(os.path.join(d, "spool.sent"))
        os.symlink("/dev/full", os.path.join(d, "spool.sent"))
        prog = c_program(tmp, MARKER_PROGRAM)
        r = subprocess.run([prog, config, d], capture_output=True, text=True, timeout=120, cwd=ROOT)
        eq(r.returncode, 0, f"the program: {r.stdout} {r.stderr}")
        lines = r.stdout.splitlines()
        check(lines[0].startswith("flush -6 0 ") and "No space left on device" in lines[0], r.stdout)
        check(lines[1].startswith("publish 0 0 "), f"the next publish is sent: {r.stdout}")
        eq(queued_ids(), spooled + [lines[1].split()[3]], "the spooled three, then the new one")
        eq(os.path.getsize(os.path.join(d, "spool.log")), 0, "the log is empty")
    finally:
        purge()
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.unlink(config)


def test_a_closed_stdout_still_ends_the_run_by_sigpipe():
    """conveyor-produce ignores SIGPIPE (a reset Redis connection must fail its
    write, not kill the run); its stdout's reader gone (`| head -1`) still ends
    it by SIGPIPE at the first ids written, reading no further line."""
    config = idle_config()
    d = tempfile.mkdtemp(prefix="conveyor-spool-")
    try:
        p = subprocess.Popen([os.path.join(BIN, "conveyor-produce"), "-c", config, "--spool", d],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             env={**os.environ, **down_env()}, cwd=ROOT)
        p.stdout.close()  # the reader is gone before the first id
        try:
            p.stdin.write(lines_of([product(i) for i in range(3000)]).encode())
            p.stdin.close()
        except BrokenPipeError:
            pass
        eq(p.wait(120), -signal.SIGPIPE, "ended by SIGPIPE")
        check(status(d)["records"] < 3000, "no further line read after the ids could not be written")
    finally:
        shutil.rmtree(d, ignore_errors=True)
        os.unlink(config)


def test_refusals_are_never_spooled():
    """An invalid command (exit 5) and a full queue (exit 6) are not spooled,
    whether or not the broker is up; a full queue holding up what waits refuses
    the new command rather than spool it behind."""
    purge()
    d = tempfile.mkdtemp(prefix="conveyor-spool-")
    config = idle_config(queue_opts="max_length = 2;")
    try:
        for env in (down_env(), None):
            r = produce(config, "--spool", d, "noSuchCommand", "{}", env=env)
            eq(r.returncode, EXIT_INVALID, f"an unknown type: {r.stderr}")
            r = produce(config, "--spool", d, "createProduct", "[1]", env=env)
            eq(r.returncode, EXIT_INVALID, f"a payload that is not an object: {r.stderr}")
            r = produce(config, "--spool", d, input_='{"type":"createProduct"}\n', env=env)
            eq(r.returncode, EXIT_INVALID, f"a line without a payload: {r.stderr}")
            eq(status(d)["records"], 0, "none of them spooled")

        setup_with(config)  # RabbitMQ: the max-length policy
        r = produce(config, "--spool", d, input_=lines_of([product("a"), product("b")]))
        eq(r.returncode, 0, f"two fit: {r.stderr}")
        eq(status(d)["records"], 0, "sent, not spooled")
        r = produce(config, "--spool", d, "createProduct", json.dumps({"name": "c", "price": 1}))
        eq(r.returncode, EXIT_FULL, f"a full queue: {r.stderr}")
        check("max_length 2" in r.stderr, r.stderr)
        r = produce(config, "--spool", d, input_=lines_of([product("d")]))
        eq(r.returncode, EXIT_FULL, f"on stdin: {r.stderr}")
        check("stdin line 1 refused, not queued" in r.stderr, r.stderr)
        eq(status(d)["records"], 0, "a full queue is not spooled")

        waiting = product("waiting")
        r = produce(config, "--spool", d, input_=lines_of([waiting]), env=down_env())
        eq((r.returncode, status(d)["records"]), (0, 1), f"one spooled while the broker is away: {r.stderr}")
        r = produce(config, "--spool", d, "createProduct", json.dumps({"name": "e", "price": 1}))
        eq(r.returncode, EXIT_FULL, f"behind a spool its full queue holds up: {r.stderr}")
        check("waiting in the spool" in r.stderr and "max_length 2" in r.stderr, r.stderr)
        eq(status(d)["records"], 1, "the waiting one still waits, the new one is not spooled")
        purge()
        r = produce(config, "--spool", d, "--flush")
        eq(r.returncode, 0, f"sent once the queue drained: {r.stderr}")
        eq(queued_ids(), [waiting["id"]], "the waiting one")
    finally:
        if TRANSPORT == "rabbitmq":  # the limits --setup set, on every queue of config
            for q in ("users", "catalog", "orders"):
                try:
                    management("DELETE", f"policies/%2F/conveyor.{q}.max-length")
                except urllib.error.HTTPError as e:
                    if e.code != 404:
                        raise
        purge()
        shutil.rmtree(d, ignore_errors=True)
        os.unlink(config)


def test_the_c_example_publishes_through_its_spool():
    """examples/c/spool.c (public header only), built against the build tree:
    with the broker away its commands are spooled and returned as published;
    the next run sends them first, then its own."""
    purge()
    config = idle_config()
    d = tempfile.mkdtemp(prefix="conveyor-spool-")
    try:
        r = run_bin("conveyor-example-spool", config, d, "5", env=down_env())
        eq(r.returncode, 0, f"the example with the broker away: {r.stderr}")
        out = r.stdout.splitlines()
        first = out[:5]
        check("published 5 (5 spooled)" in out, r.stdout)
        check(any(line.startswith("flush: ") for line in out), f"the flush says why it did not send: {r.stdout}")
        check(any(line.startswith("waiting 5 records, ") for line in out), r.stdout)
        r = run_bin("conveyor-example-spool", config, d, "3")
        eq(r.returncode, 0, f"the example with the broker back: {r.stderr}")
        out = r.stdout.splitlines()
        check("published 3 (0 spooled)" in out and "flushed 0" in out, r.stdout)
        check("waiting 0 records, 0 bytes, oldest -" in out, r.stdout)
        eq(queued_ids(), first + out[:3], "the spooled five first, in order, then the three")
    finally:
        purge()
        shutil.rmtree(d, ignore_errors=True)
        os.unlink(config)


def test_the_flags_and_exit_status_are_documented():
    """--help lists --spool, --flush, --status and exit 7; the README's exit-status
    rule, its spool section and contract.md say the same."""
    h = " ".join(run_bin("conveyor-produce", "--help").stdout.split())
    for flag in ("--spool DIR", "--flush", "--status", "producer.spool_max_bytes"):
        check(flag in h, f"--help names {flag}: {h}")
    check("7 the spool (--spool) is full, locked by another process" in h, f"--help: exit 7: {h}")
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    check("### The offline spool" in readme and "and 7, a full or locked spool" in readme, "README: the spool, exit 7")
    contract = " ".join(open(os.path.join(ROOT, "docs", "contract.md")).read().split())
    check("| `CONVEYOR_ESPOOL` | -6 |" in contract and "It exits **7**" in contract, "contract.md: ESPOOL, exit 7")
    r = run_bin("conveyor-produce", "--flush")
    eq(r.returncode, 2, f"--flush without --spool is a usage error: {r.stderr}")


def test_a_down_broker_is_tried_at_most_once_a_second():
    """With the broker away, publishing does not try it on every command: 300
    publishes of the C example against a listener that takes each connection and
    closes it see a handful of connections, not one per command."""
    config = idle_config()
    d = tempfile.mkdtemp(prefix="conveyor-spool-")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    tries = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            tries.append(time.time())
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    env = ({"CONVEYOR_RABBITMQ_URL": f"amqp://guest:guest@127.0.0.1:{port}"} if TRANSPORT == "rabbitmq"
           else {"CONVEYOR_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    try:
        r = run_bin("conveyor-example-spool", config, d, "300", env=env)
        eq(r.returncode, 0, f"the example: {r.stderr}")
        check("published 300 (300 spooled)" in r.stdout, r.stdout)
        check(1 <= len(tries) < 30, f"{len(tries)} connections for 300 publishes and a flush")
        print(f"FIGURES spool: {len(tries)} connections for 300 publishes and a flush")
    finally:
        listener.close()
        shutil.rmtree(d, ignore_errors=True)
        os.unlink(config)


def test_a_flush_killed_midway_sends_again_at_most_its_window():  # faults (Release only: 6,000 records and a kill)
    """--flush killed -9 in a window once its sent marker passed a quarter of the file:
    the next --flush sends the rest, and what it sends twice is at most one
    window of confirms (500), with the same ids, in order; each is applied once."""
    purge()
    config = idle_config()
    d = tempfile.mkdtemp(prefix="conveyor-spool-")
    envs = [product(i) for i in range(6000)]
    try:
        r = produce(config, "--spool", d, input_=lines_of(envs), env=down_env())
        eq(r.returncode, 0, f"spooled: {r.stderr}")
        eq(status(d)["records"], len(envs), "all wait")
        marker = os.path.join(d, "spool.sent")
        quarter = os.path.getsize(os.path.join(d, "spool.log")) // 4
        p = subprocess.Popen([os.path.join(BIN, "conveyor-produce"), "-c", config, "--spool", d, "--flush"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.time() + 60
        while not (os.path.exists(marker) and os.path.getsize(marker) == 16
                   and struct.unpack("<Q", open(marker, "rb").read(8))[0] >= quarter):
            check(time.time() < deadline and p.poll() is None, "the flush moves its marker past a quarter")
            time.sleep(0.001)
        time.sleep(0.01)  # into the next window
        p.kill()
        p.wait()
        left = status(d)["records"]
        check(0 < left < len(envs), f"killed midway: {left} of {len(envs)} wait")
        r = produce(config, "--spool", d, "--flush")
        eq(r.returncode, 0, f"the next flush: {r.stderr}")
        eq(status(d)["records"], 0, "none waits")
        queued = queued_ids()
        same_order(first_copies(queued), [e["id"] for e in envs], "each sent, in the order spooled")
        check(len(envs) <= len(queued) <= len(envs) + 500, f"sent again: at most one window ({len(queued)})")
        print(f"FIGURES spool: {left} waited after the flush was killed; {len(queued) - len(envs)} sent twice")
        t0 = time.time()
        with Pool(workers={"users": 0, "catalog": 2, "orders": 0}) as pool:  # what was sent twice: applied once
            eq(wait_applied([e["id"] for e in envs], timeout=200), {"applied": len(envs)}, "each applied")
            eq(pool.stop(), (0, []), "clean stop")
        pids = [e["payload"]["productId"] for e in envs]
        eq(query("SELECT count(*) FROM products WHERE id = ANY(%s::uuid[])", pids)[0][0], len(envs), "once each")
        print(f"FIGURES spool: {len(envs)} applied in {time.time() - t0:.1f} s")
    finally:
        purge()
        shutil.rmtree(d, ignore_errors=True)
        os.unlink(config)


def test_a_broker_lost_mid_stream_spools_then_catches_up():  # faults (Release only: a broker stopped and started)
    """One conveyor-produce --spool reading stdin while its broker goes away
    (after it was reached) and comes back: the commands meanwhile are spooled,
    the first ones after the return send the spool first, the run ends with an
    empty spool, exit 0, and the queue holds every command in stdin's order."""
    purge()
    config = idle_config()
    d = tempfile.mkdtemp(prefix="conveyor-spool-")
    envs = [product(i) for i in range(3000)]
    log = log_file("conveyor-produce-stream-")
    p = subprocess.Popen([os.path.join(BIN, "conveyor-produce"), "-c", config, "--spool", d],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    printed = []

    def read():
        for line in p.stdout:
            printed.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def feed(part, until):
        for i in range(0, len(part), 20):
            p.stdin.write(lines_of(part[i:i + 20]))
            p.stdin.flush()
            time.sleep(0.005)
        deadline = time.time() + 120
        while len(printed) < until:
            check(time.time() < deadline and p.poll() is None, f"{len(printed)} of {until} ids printed")
            time.sleep(0.02)

    stopped = False
    try:
        feed(envs[:1000], 1000)
        eq(status(d)["records"], 0, "with the broker up nothing is spooled")
        stop_broker()
        stopped = True
        feed(envs[1000:2000], 2000)
        check(status(d)["records"] >= 1000, "with the broker away they are spooled")
        start_broker()
        stopped = False
        feed(envs[2000:], 3000)
        p.stdin.close()
        eq(p.wait(120), 0, "the run ends well")
        reader.join(10)
        eq(printed, [e["id"] for e in envs], "every id printed, in order")
        eq(status(d)["records"], 0, "the spool was sent once the broker was back")
        queued = queued_ids()
        same_order(first_copies(queued), [e["id"] for e in envs], "the queue holds them in stdin's order")
        print(f"FIGURES spool: {len(queued) - len(envs)} sent twice (unconfirmed when the broker went)")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if stopped:
            start_broker()
        purge()
        shutil.rmtree(d, ignore_errors=True)
        os.unlink(config)
