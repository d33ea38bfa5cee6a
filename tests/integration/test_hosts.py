"""tests/hosts.sh: test hosts on one machine (network namespaces on a bridge),
the ground of the multi-host tests. Hosts are made twice (idempotent), reach
each other by name, a partitioned host is unreachable until healed, and down
removes everything, twice."""
import os
import subprocess
import time

from harness import ROOT, Failure, check, eq

HOSTS = os.path.join(ROOT, "tests", "hosts.sh")
SERVER = ("import socket,sys\n"
          "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 7001)); s.listen()\n"
          "print('listening', flush=True)\n"
          "while True:\n"
          "    c,_=s.accept(); c.sendall(c.getsockname()[0].encode() + b' ' + c.recv(64)); c.close()\n")
CLIENT = ("import socket,sys\n"
          "try:\n"
          "    c=socket.create_connection((sys.argv[1], 7001), timeout=1.5); c.sendall(b'hello'); print(c.recv(64).decode())\n"
          "except OSError as e:\n"
          "    print('unreachable', e); sys.exit(3)\n")


BULK = ("import socket\n"  # sends 512 KiB to each caller
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 7002)); s.listen()\n"
        "print('listening', flush=True)\n"
        "while True:\n"
        "    c,_=s.accept(); c.sendall(b'x' * 524288); c.close()\n")
FETCH = ("import socket,sys,time\n"  # prints the seconds 512 KiB took
         "t=time.time(); c=socket.create_connection((sys.argv[1], 7002), timeout=30); n=0\n"
         "while True:\n"
         "    b=c.recv(65536)\n"
         "    if not b: break\n"
         "    n+=len(b)\n"
         "print(n, time.time()-t)\n")


def fetch(host, target):
    r = subprocess.run([HOSTS, "exec", host, "/usr/bin/python3", "-c", FETCH, target], capture_output=True, text=True,
                       timeout=60)
    eq(r.returncode, 0, f"fetch from {target}: {r.stderr}")
    n, secs = r.stdout.split()
    eq(int(n), 524288, "every byte arrived")
    return float(secs)


def hosts(*args, check_=True):
    r = subprocess.run([HOSTS, *args], capture_output=True, text=True, timeout=60)
    if check_ and r.returncode != 0:
        raise Failure(f"hosts.sh {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


def netns_list():
    return sorted(line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                              text=True).stdout.splitlines() if line.startswith("cvh"))


def call(host, target):
    return subprocess.run([HOSTS, "exec", host, "/usr/bin/python3", "-c", CLIENT, target], capture_output=True,
                          text=True, timeout=30)


def test_hosts_reach_each_other_and_partitions_cut_them():
    hosts("down")
    server = None
    try:
        hosts("up", "3")
        hosts("up", "3")  # again: nothing changes
        eq(netns_list(), ["cvh1", "cvh2", "cvh3"], "three hosts")
        eq(hosts("addr", "cvh2").stdout.strip(), "10.77.0.12", "cvh2's address")
        server = subprocess.Popen([HOSTS, "exec", "cvh2", "/usr/bin/python3", "-c", SERVER], stdout=subprocess.PIPE,
                                  text=True)
        eq(server.stdout.readline().strip(), "listening", "a server inside cvh2")
        r = call("cvh1", "cvh2")
        eq((r.returncode, r.stdout.strip()), (0, "10.77.0.12 hello"), f"cvh1 reaches cvh2 by name ({r.stderr})")
        eq(call("cvh3", "10.77.0.12").returncode, 0, "cvh3 reaches it by address")
        hosts("partition", "cvh2")
        t = time.time()
        r = call("cvh1", "cvh2")
        eq(r.returncode, 3, f"a partitioned host is unreachable: {r.stdout}")
        check(time.time() - t < 10, "the client's own timeout decides")
        check(server.poll() is None, "the partitioned host's processes keep running")
        hosts("heal", "cvh2")
        r = call("cvh1", "cvh2")
        eq((r.returncode, r.stdout.strip()), (0, "10.77.0.12 hello"), "healed")
        # a slow, lossy link (tc tbf: 2 Mbit/s, what waits over 20 ms dropped): 512 KiB cannot pass in
        # under 2.1 s (a floor set by the rate, not a timing of this machine), and "off" lifts it
        bulk = subprocess.Popen([HOSTS, "exec", "cvh2", "/usr/bin/python3", "-c", BULK], stdout=subprocess.PIPE,
                                text=True)
        try:
            eq(bulk.stdout.readline().strip(), "listening", "a bulk server inside cvh2")
            hosts("throttle", "cvh2", "2mbit")
            slow = fetch("cvh1", "cvh2")
            check(slow >= 1.8, f"512 KiB through a 2 Mbit/s link took {slow:.2f} s")
            hosts("throttle", "cvh2", "off")
            fast = fetch("cvh1", "cvh2")
            check(fast < slow / 2, f"unthrottled: {fast:.2f} s against {slow:.2f} s")
            eq(hosts("throttle", "cvh2", "fast", check_=False).returncode, 1, "a rate that is not one")
        finally:
            bulk.kill()
            bulk.wait()
        r = hosts("partition", "cvh9", check_=False)
        eq(r.returncode, 1, "an unknown host")
        check("cvh9 is not up" in r.stderr, f"says so: {r.stderr}")
        eq(hosts("bogus", check_=False).returncode, 2, "usage")
    finally:
        if server:
            server.kill()
            server.wait()
        hosts("down")
    hosts("down")  # again: nothing left to remove
    eq(netns_list(), [], "no host left")
    eq(subprocess.run(["ip", "link", "show", "cvbr0"], capture_output=True).returncode != 0, True, "no bridge left")
    check(not any(d.startswith("cvh") for d in os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else True,
          "no hosts file left")
