#!/usr/bin/python3
"""Two builds of Conveyor measured in one run: bench/run.py against build A, then
B, then A, then B ... (ROUNDS each), on the same servers, so that the host's
drift falls on both alike. Prints, per end-to-end case, each build's
throughput as a ratio to the pgbench x1 run just before it (the host's speed at
that moment), CPU per command of the workers and the relay, and B/A; and the
spread of A's own rounds, which is the noise a difference must beat.

    bench/compare_builds.py OLD_BUILD_DIR NEW_BUILD_DIR [--rounds 2] [run.py options]

Example (issue 22's before/after in docs/performance.md):
    git worktree add /tmp/old <rev> && (cd /tmp/old && scripts/build.sh)
    bench/compare_builds.py /tmp/old/build build --rounds 2 --commands 10000
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_once(bin_dir, extra):
    """One bench/run.py against bin_dir; its figures (results JSON)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = dict(os.environ, CONVEYOR_BIN_DIR=os.path.abspath(bin_dir))
    subprocess.run([sys.executable, os.path.join(HERE, "run.py"), "--json", out, *extra], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    with open(out) as f:
        figures = json.load(f)
    os.unlink(out)
    return figures


def cases(figures):
    """{case: (throughput / pgbench x1 before it, workers' + relay's us per
    command, p99 ms at half rate or None)}."""
    out = {}
    for case, runs in figures["conveyor"].items():
        full = runs["full"]
        before = full.get("pgbenchX1Before")  # commands/s of the pgbench x1 run just before it
        if isinstance(before, dict):
            before = before.get("commandsPerSecond")
        base = before or figures["pgbench"]["x1"]["commandsPerSecond"]
        us = full.get("cpu", {}).get("usPerCommand", {})
        half = (runs.get("halfRate") or {}).get("latencyMs", {}).get("p99")
        out[case] = (full["commandsPerSecond"] / base, us.get("workers", 0) + us.get("relay", 0), half)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="build A (before)")
    ap.add_argument("b", help="build B (after)")
    ap.add_argument("--rounds", type=int, default=2)
    args, extra = ap.parse_known_args()
    results = {"A": [], "B": []}
    for r in range(args.rounds):
        for name, d in (("A", args.a), ("B", args.b)):
            print(f"round {r + 1}: build {name} ({d})", file=sys.stderr, flush=True)
            results[name].append(cases(run_once(d, extra)))
            print(f"  {name}: " + ", ".join(f"{c} {v[0]:.2f} x limit, p99 {v[2]} ms" for c, v in results[name][-1].items()),
                  file=sys.stderr, flush=True)
    print(f"{'case':<20} {'A ratio':>8} {'B ratio':>8} {'B/A':>6} {'A spread':>9} {'A us/cmd':>9} {'B us/cmd':>9} "
          f"{'A p99':>7} {'B p99':>7}")
    for case in results["A"][0]:
        a = [x[case][0] for x in results["A"]]
        b = [x[case][0] for x in results["B"]]
        ua = statistics.median(x[case][1] for x in results["A"])
        ub = statistics.median(x[case][1] for x in results["B"])
        ma, mb = statistics.median(a), statistics.median(b)
        spread = (max(a) - min(a)) / ma if ma else 0
        pa = statistics.median(x[case][2] or 0 for x in results["A"])
        pb = statistics.median(x[case][2] or 0 for x in results["B"])
        print(f"{case:<20} {ma:>8.2f} {mb:>8.2f} {mb / ma if ma else 0:>6.2f} {spread:>8.0%} {ua:>9.1f} {ub:>9.1f} "
              f"{pa:>7.1f} {pb:>7.1f}")


if __name__ == "__main__":
    main()
