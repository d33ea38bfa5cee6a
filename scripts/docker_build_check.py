#!/usr/bin/env python3
"""Checks the build stage of docker/Dockerfile without a Docker engine.

Reads the stage named `build` (from its FROM to the next FROM), copies into a
clean temporary folder exactly what its COPY lines copy from the build context
(the repository root), and runs the RUN lines that follow the first COPY (the
configure, build and install commands; the apt-get line before them is the
image's, not the source's) with `sh -c`, the stage's WORKDIR and the absolute
paths it uses (/build, /out) moved under the temporary folder. A source file the
stage forgets to copy then fails here as it would in `docker build`.

    scripts/docker_build_check.py [--dockerfile PATH] [--keep]

Exit status 0 when every command succeeded, 1 when one failed (its output is
printed), 2 when the Dockerfile cannot be read as expected. The temporary folder
is deleted unless --keep.
"""
import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def logical_lines(text):
    """The Dockerfile's instructions: continuation lines joined, comments dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append((cur + line).strip())
        cur = ""
    if cur:
        out.append(cur.strip())
    return out


def build_stage(lines):
    """The instructions of the stage named build, without its FROM."""
    stage, inside = [], False
    for line in lines:
        word = line.split(None, 1)[0].upper()
        if word == "FROM":
            if inside:
                break
            inside = re.search(r"\bAS\s+build\s*$", line, re.IGNORECASE) is not None
            continue
        if inside:
            stage.append(line)
    if not stage:
        raise ValueError("no stage 'FROM ... AS build' in the Dockerfile")
    return stage


def copy_sources(args, context, dest_dir):
    """COPY SRC... DEST (relative to the context; DEST relative to dest_dir): as
    Docker does, a directory's contents go into DEST (made if missing), a file
    into DEST/ when DEST ends with '/' or several sources are given."""
    parts = shlex.split(args)
    if any(p.startswith("--") for p in parts):
        raise ValueError(f"COPY flags are not supported here: {args}")
    *srcs, dest = parts
    target = dest if os.path.isabs(dest) else os.path.join(dest_dir, dest)
    for src in srcs:
        matches = sorted(glob.glob(os.path.join(context, src)))
        if not matches:
            raise FileNotFoundError(f"COPY {src}: not in the build context")
        for m in matches:
            if os.path.isdir(m):
                shutil.copytree(m, target, dirs_exist_ok=True, symlinks=True)
            else:
                into = target.endswith("/") or len(srcs) > 1 or len(matches) > 1 or os.path.isdir(target)
                os.makedirs(target if into else os.path.dirname(target) or ".", exist_ok=True)
                shutil.copy2(m, os.path.join(target, os.path.basename(m)) if into else target)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dockerfile", default=os.path.join(ROOT, "docker", "Dockerfile"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    opt = ap.parse_args()
    try:
        stage = build_stage(logical_lines(open(opt.dockerfile).read()))
    except (OSError, ValueError) as e:
        print(f"docker_build_check: {e}", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="conveyor-docker-build-")
    # the stage's absolute paths, moved under tmp (longest first: /src before /)
    moved = {"/build": os.path.join(tmp, "build"), "/out": os.path.join(tmp, "out")}
    workdir = None
    copied = False
    status = 0
    try:
        for line in stage:
            word, _, args = line.partition(" ")
            word = word.upper()
            if word == "WORKDIR":
                moved[args.strip()] = os.path.join(tmp, "src")
                workdir = moved[args.strip()]
                os.makedirs(workdir, exist_ok=True)
            elif word == "COPY":
                if workdir is None:
                    raise ValueError("COPY before WORKDIR")
                copy_sources(args, ROOT, workdir)
                copied = True
            elif word == "RUN" and copied:
                cmd = args
                for old in sorted(moved, key=len, reverse=True):  # whole path words only
                    cmd = re.sub(r"(?<![\w./-])" + re.escape(old) + r"(?=[/\s\"']|$)", moved[old], cmd)
                print(f"docker_build_check: RUN {cmd}", flush=True)
                r = subprocess.run(["sh", "-c", cmd], cwd=workdir, capture_output=True, text=True)
                if r.returncode != 0:
                    print(f"docker_build_check: failed (exit {r.returncode}):\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}",
                          file=sys.stderr)
                    status = 1
                    break
        if status == 0:
            if not copied:
                raise ValueError("the build stage copies nothing")
            print(f"docker_build_check: the build stage of {os.path.relpath(opt.dockerfile, ROOT)} builds "
                  f"(copied: {', '.join(sorted(os.listdir(workdir)))})")
    except (OSError, ValueError) as e:
        print(f"docker_build_check: {e}", file=sys.stderr)
        status = 2
    finally:
        if opt.keep:
            print(f"docker_build_check: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
