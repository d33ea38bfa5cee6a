#!/usr/bin/python3
"""Runs one integration test case: run.py MODULE.CASE (CTest runs each as its own entry)."""
import importlib
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    if len(sys.argv) != 2 or "." not in sys.argv[1]:
        print("usage: run.py MODULE.CASE", file=sys.stderr)
        return 2
    module, case = sys.argv[1].split(".", 1)
    import harness
    # schema and topology exist before any test touches them, as after a deploy; not
    # for a module that needs no server (`SERVERS = False`, as tests/CMakeLists.txt reads it)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), module + ".py")
    serverless = False
    if os.path.exists(path):
        with open(path) as f:
            serverless = re.search(r"^SERVERS = False", f.read(), re.M) is not None
    if not serverless:
        harness.setup()
    fn = getattr(importlib.import_module(module), case, None)
    if fn is None:
        print(f"no test case {sys.argv[1]}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        fn()
    except Exception:
        traceback.print_exc()
        print(f"FAIL {sys.argv[1]} ({os.environ.get('CONVEYOR_TRANSPORT')}) {time.time() - t0:.1f}s")
        return 1
    print(f"ok {sys.argv[1]} ({os.environ.get('CONVEYOR_TRANSPORT')}) {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
