"""libconveyor, the C client as a library that installs like one (issue 26, part 3).

`cmake --install` of the build under test (CONVEYOR_BIN_DIR) into a temporary
prefix gives: libconveyor.so -> libconveyor.so.<major> -> libconveyor.so.<version>
whose SONAME is libconveyor.so.<major> and which exports the conveyor_*
functions of conveyor.h and nothing else (`nm -D`, version node CONVEYOR_<major>);
conveyor.h alone in include/, compiling alone in C and C++ with -pedantic, its
CONVEYOR_E* values those of docs/contract.md; conveyor.pc and the CMake package
Conveyor. The examples of examples/c/ are then built against that installed copy
alone, never the build tree: with pkg-config (the README's line `cc -o publish
publish.c $(pkg-config --cflags --libs conveyor)`, and examples/c/Makefile, whose
recipe is the same), and with find_package(Conveyor) (examples/c/CMakeLists.txt);
each program resolves
libconveyor into the prefix (ldd), and `publish` publishes a command to a
running pool and prints its result event, on both transports; `spool` spools
with its broker away and sends what waits at its next run.

In the ASan build the installed library needs the sanitizers' runtime first in
the process, as any ASan-built library does: there the examples are built with
the same -fsanitize flags (read from the library's NEEDED entries), so they run
the library under ASan too; the Release build's examples have no such flag.
"""
import glob
import json
import os
import re
import shlex
import subprocess
import tempfile
import time

from harness import BIN, ROOT, TRANSPORT, Pool, check, eq, log_file, query

EXAMPLES = os.path.join(ROOT, "examples", "c")
# the codes of the C client as they were when the library was first installable:
# never changed (docs/contract.md, "The C client's codes"; docs/versioning.md)
STABLE_CODES = {"CONVEYOR_OK": 0, "CONVEYOR_EINVALID": -1, "CONVEYOR_EBROKER": -2, "CONVEYOR_ETIMEOUT": -3,
                "CONVEYOR_REJECTED": -4, "CONVEYOR_EFULL": -5}
SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")


def run(cmd, what, cwd=None, env=None, timeout=300, ok=True):
    """Runs cmd; its output is kept in the test logs. With ok, a non-zero exit fails the test."""
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    with log_file("library-") as f:
        f.write(f"$ {' '.join(cmd)}\n{r.stdout}\n{r.stderr}".encode(errors="replace"))
    if ok:
        eq(r.returncode, 0, f"{what}: exit status (stdout: {r.stdout[-1500:]}\nstderr: {r.stderr[-1500:]})")
    return r


def project_version():
    m = re.search(r"^project\(conveyor VERSION (\d+)\.(\d+)\.(\d+)", open(os.path.join(ROOT, "CMakeLists.txt")).read(),
                  re.M)
    check(m, "CMakeLists.txt: project(conveyor VERSION x.y.z)")
    return m.group(1), ".".join(m.groups())


class Installed:
    """The build under test installed with cmake --install into a temporary prefix."""

    def __init__(self, tmp):
        self.prefix = os.path.join(tmp, "prefix")
        run(["cmake", "--install", BIN, "--prefix", self.prefix], "cmake --install")
        libs = glob.glob(os.path.join(self.prefix, "lib*", "libconveyor.so")) + \
            glob.glob(os.path.join(self.prefix, "lib", "*", "libconveyor.so"))
        eq(len(libs), 1, f"one libconveyor.so in the installed tree {self.prefix}")
        self.lib = libs[0]
        self.libdir = os.path.dirname(self.lib)
        self.include = os.path.join(self.prefix, "include")
        needed = run(["readelf", "-d", self.lib], "readelf -d").stdout
        # an ASan-built library: its programs need the sanitizers too (see the module's text)
        self.sanitize = ["-fsanitize=address,undefined"] if "libasan" in needed else []


def outside(path, what):
    """Fails when path (a file or folder a program was built or runs with) is in the repository or the build tree."""
    real = os.path.realpath(path)
    for tree in (ROOT, BIN):
        check(not (real + "/").startswith(os.path.realpath(tree) + "/"), f"{what}: {path} is in {tree}")


def api_functions(header_text):
    """The conveyor_* functions a header declares (its comments left out)."""
    code = re.sub(r"/\*.*?\*/|//[^\n]*", "", header_text, flags=re.S)
    return set(re.findall(r"\b(conveyor_\w+)\s*\(", code))


def contract_codes():
    """{name: value} of the table in docs/contract.md, "The C client's codes"."""
    text = open(os.path.join(ROOT, "docs", "contract.md")).read()
    return {n: int(v) for n, v in re.findall(r"^\| `(CONVEYOR_\w+)` \| (-?\d+) \|", text, re.M)}


def test_installed_library_exports_only_the_api_rabbitmq():
    """Once (no transport in it): the installed tree, the SONAME, the exported
    symbols, the header alone, the codes, the pkg-config and CMake files."""
    major, version = project_version()
    with tempfile.TemporaryDirectory(prefix="conveyor-lib-") as tmp:
        inst = Installed(tmp)
        # the tree: the library's three names, one header, conveyor.pc, the CMake package
        eq(os.readlink(inst.lib), f"libconveyor.so.{major}", "libconveyor.so links to the SONAME")
        eq(os.readlink(os.path.join(inst.libdir, f"libconveyor.so.{major}")), f"libconveyor.so.{version}",
           "the SONAME links to the versioned file")
        eq(sorted(os.listdir(inst.include)), ["conveyor.h"], "the installed include folder holds conveyor.h alone")
        package = sorted(os.listdir(os.path.join(inst.libdir, "cmake", "Conveyor")))
        eq([f for f in package if not re.fullmatch(r"ConveyorTargets-\w+\.cmake", f)],
           ["ConveyorConfig.cmake", "ConveyorConfigVersion.cmake", "ConveyorTargets.cmake"],
           "the CMake package's files (and the targets of the build's configuration)")
        check(len(package) == 4, f"one configuration's targets file: {package}")
        check(os.path.exists(os.path.join(inst.libdir, "pkgconfig", "conveyor.pc")), "conveyor.pc installed")

        # SONAME, and no run path into the build tree
        dyn = run(["readelf", "-d", inst.lib], "readelf -d").stdout
        eq(re.findall(r"\(SONAME\)\s+Library soname: \[(.*?)\]", dyn), [f"libconveyor.so.{major}"], "SONAME")
        for path in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r\w*path: \[(.*?)\]", dyn):
            for p in path.split(":"):
                outside(p, "the installed library's run path")

        # exported: the header's functions, each in the version node, and the node itself
        header = open(os.path.join(inst.include, "conveyor.h")).read()
        api = api_functions(header)
        check(len(api) >= 9, f"conveyor.h declares the API ({sorted(api)})")
        nm = run(["nm", "-D", "--defined-only", inst.lib], "nm -D").stdout
        # a version node is CONVEYOR_<major>, or CONVEYOR_<major>.<minor> for a function added later
        node = re.compile(rf"CONVEYOR_{major}(\.\d+)?")
        exported, nodes, other = set(), set(), []
        for line in nm.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "A" and node.fullmatch(parts[2]):
                nodes.add(parts[2])
            elif len(parts) == 3 and parts[1] == "T" and "@@" in parts[2] and node.fullmatch(parts[2].split("@@")[1]):
                exported.add(parts[2].split("@@")[0])
            else:
                other.append(line)
        eq(other, [], "symbols libconveyor exports besides the conveyor_* functions and its version nodes")
        check(f"CONVEYOR_{major}" in nodes, f"the version node CONVEYOR_{major} ({sorted(nodes)})")
        eq(sorted(exported), sorted(api), "the exported functions are the header's")
        # the internal code is in the library but hidden: a program cannot link it
        check(re.search(r"^\w+ t cfg_free$", run(["nm", inst.lib], "nm").stdout, re.M),
              "cfg_free (conveyor_close's, internal) is a local symbol of the library")
        prog = os.path.join(tmp, "internal.c")
        with open(prog, "w") as f:
            f.write("void cfg_free(void *);\nint main(void) { cfg_free(0); return 0; }\n")
        r = run(["cc", prog, f"-L{inst.libdir}", "-lconveyor", "-o", os.path.join(tmp, "internal"),
                 *inst.sanitize], "linking an internal function", ok=False)
        check(r.returncode != 0 and "cfg_free" in r.stderr, f"an internal function does not link: {r.stderr}")

        # the header: only system headers, alone in C and C++ with -pedantic
        for inc in re.findall(r'^\s*#\s*include\s*(\S+)', header, re.M):
            check(inc.startswith("<") and not glob.glob(os.path.join(ROOT, "*", inc.strip("<>"))),
                  f"conveyor.h includes {inc}: a Conveyor header, or not a system one")
        src = "#include <conveyor.h>\nint main(void) { conveyor_client *c = 0; conveyor_close(c); return CONVEYOR_OK; }\n"
        for compiler, lang, std in (("cc", "c", "c99"), ("cc", "c", "c11"), ("c++", "c++", "c++11"),
                                    ("c++", "c++", "c++17")):
            r = subprocess.run([compiler, "-x", lang, f"-std={std}", "-Wall", "-Wextra", "-Werror", "-pedantic",
                                f"-I{inst.include}", "-fsyntax-only", "-"], input=src, capture_output=True, text=True,
                               timeout=60)
            eq(r.returncode, 0, f"conveyor.h alone with {compiler} -std={std} -pedantic: {r.stderr}")

        # the codes, compiled against the installed header: the contract's table, the first ones unchanged
        codes = contract_codes()
        in_header = set(re.findall(r"\b(CONVEYOR_(?:OK|E[A-Z]+|REJECTED))\s*=", header))
        eq(sorted(in_header), sorted(codes), "the codes of conveyor.h are the table of docs/contract.md")
        prog = os.path.join(tmp, "codes.c")
        with open(prog, "w") as f:
            f.write("#include <conveyor.h>\n#include <stdio.h>\nint main(void) {\n" +
                    "".join(f'    printf("{n} %d\\n", {n});\n' for n in sorted(codes)) + "    return 0;\n}\n")
        run(["cc", f"-I{inst.include}", prog, "-o", os.path.join(tmp, "codes")], "the codes' program")
        got = {n: int(v) for n, v in (line.split() for line in
                                      run([os.path.join(tmp, "codes")], "the codes").stdout.splitlines())}
        eq(got, codes, "CONVEYOR_* values compiled from the installed header = docs/contract.md")
        eq({n: got.get(n) for n in STABLE_CODES}, STABLE_CODES, "the first codes keep their values")

        # pkg-config: the version, and flags into the prefix alone
        env = {"PKG_CONFIG_PATH": os.path.join(inst.libdir, "pkgconfig")}
        eq(run(["pkg-config", "--modversion", "conveyor"], "pkg-config", env=env).stdout.strip(), version,
           "pkg-config --modversion conveyor")
        flags = run(["pkg-config", "--cflags", "--libs", "conveyor"], "pkg-config", env=env).stdout.split()
        check("-lconveyor" in flags, f"pkg-config --libs: -lconveyor ({flags})")
        for flag in flags:
            if flag.startswith(("-I", "-L")):
                real = os.path.realpath(flag[2:])
                check(real in (os.path.realpath(inst.include), os.path.realpath(inst.libdir)),
                      f"pkg-config's {flag} is the installed include or lib folder")


def built_programs(folder):
    """{name: path} of the programs a build made of examples/c/*.c, each checked to exist."""
    out = {}
    for src in sorted(glob.glob(os.path.join(EXAMPLES, "*.c"))):
        name = os.path.splitext(os.path.basename(src))[0]
        out[name] = os.path.join(folder, name)
        check(os.access(out[name], os.X_OK), f"{folder}: no program {name} for examples/c/{name}.c")
    return out


def check_against_installed(program, inst):
    """The program loads libconveyor from the prefix and sees nothing of the build tree."""
    ldd = run(["ldd", program], f"ldd {program}").stdout
    found = re.findall(r"^\s*libconveyor\.so\.\S+ => (\S+)", ldd, re.M)
    eq(len(found), 1, f"{program}: ldd shows libconveyor once:\n{ldd}")
    check(os.path.realpath(found[0]).startswith(os.path.realpath(inst.libdir) + "/"),
          f"{program}: libconveyor resolves to {found[0]}, not into {inst.libdir}")
    for path in re.findall(r"=> (/\S+)", ldd):
        outside(path, f"{program}: a library it loads")
    dyn = run(["readelf", "-d", program], "readelf -d").stdout
    for path in re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library r\w*path: \[(.*?)\]", dyn):
        for p in path.split(":"):
            outside(p, f"{program}: its run path")


def build_with_pkg_config(inst, tmp):
    """examples/c/Makefile (its recipe: cc ... $(pkg-config --cflags --libs conveyor)) in a folder of its own."""
    out = os.path.join(tmp, "pkg-config")
    os.makedirs(out)
    san = " ".join(inst.sanitize)
    r = run(["make", "-f", os.path.join(EXAMPLES, "Makefile"),
             f"CFLAGS=-O2 -std=gnu11 -Wall -Wextra -Werror -pedantic {san}",
             f"LDFLAGS=-Wl,-rpath,{inst.libdir} {san}"], "make (pkg-config)", cwd=out,
            env={"PKG_CONFIG_PATH": os.path.join(inst.libdir, "pkgconfig")})
    for line in r.stdout.splitlines():
        for flag in line.split():
            if flag.startswith(("-I", "-L")):
                outside(flag[2:], f"the pkg-config build's {flag}")
    return built_programs(out)


def build_with_cc(inst, tmp):
    """The README's line, in a shell: cc -o publish publish.c $(pkg-config --cflags --libs conveyor)."""
    out = os.path.join(tmp, "cc")
    os.makedirs(out)
    san = " ".join(inst.sanitize)
    line = (f"cc -Wall -Wextra -Werror -pedantic {san} -o publish {os.path.join(EXAMPLES, 'publish.c')} "
            f"$(pkg-config --cflags --libs conveyor) -Wl,-rpath,{inst.libdir}")
    run(["sh", "-c", line], "cc with pkg-config", cwd=out,
        env={"PKG_CONFIG_PATH": os.path.join(inst.libdir, "pkgconfig")})
    return {"publish": os.path.join(out, "publish")}


def build_with_cmake(inst, tmp):
    """examples/c/CMakeLists.txt, a project of its own: find_package(Conveyor) with CMAKE_PREFIX_PATH the prefix."""
    out = os.path.join(tmp, "cmake")
    san = " ".join(inst.sanitize)
    run(["cmake", "-S", EXAMPLES, "-B", out, f"-DCMAKE_PREFIX_PATH={inst.prefix}", "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_C_FLAGS=-Wall -Wextra -Werror -pedantic {san}", f"-DCMAKE_EXE_LINKER_FLAGS={san}",
         "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"], "cmake configure (find_package(Conveyor))")
    run(["cmake", "--build", out], "cmake --build (examples/c)")
    cache = open(os.path.join(out, "CMakeCache.txt")).read()
    m = re.search(r"^Conveyor_DIR:PATH=(.*)$", cache, re.M)
    check(m and os.path.realpath(m.group(1)).startswith(os.path.realpath(inst.prefix) + "/"),
          f"find_package(Conveyor) found the installed package ({m.group(1) if m else 'none'})")
    includes = []
    for entry in json.load(open(os.path.join(out, "compile_commands.json"))):
        args = shlex.split(entry["command"])
        includes += [a[2:] for a in args if a.startswith("-I")]
        includes += [b for a, b in zip(args, args[1:]) if a == "-isystem"]
    eq(sorted({os.path.realpath(p) for p in includes}), [os.path.realpath(inst.include)],
       "the CMake build's include folders: the installed one alone")
    return built_programs(out)


def test_examples_build_against_the_installed_copy_and_run():
    """examples/c built against the installed copy with pkg-config (the README's
    cc line, and examples/c/Makefile) and with find_package(Conveyor); each
    build's publish publishes createProduct to a pool and prints
    product.created, and the row is there; a rejection exits 1 with
    command.rejected, an unknown type exits 5, no arguments 2; the spool
    example spools two commands with its broker away, and its next run sends
    them first, then its own: the three applied."""
    with tempfile.TemporaryDirectory(prefix="conveyor-lib-") as tmp:
        inst = Installed(tmp)
        builds = {"cc $(pkg-config)": build_with_cc(inst, tmp), "make (pkg-config)": build_with_pkg_config(inst, tmp),
                  "cmake find_package": build_with_cmake(inst, tmp)}
        for programs in builds.values():
            for program in programs.values():
                check_against_installed(program, inst)

        config = os.path.join(ROOT, "queues.conf")
        with Pool() as pool:
            for how, programs in builds.items():
                publish = programs["publish"]
                name = f"Library mug ({how})"
                r = run([publish, "-c", config, "-t", "30", "createProduct",
                         json.dumps({"name": name, "price": "3.50", "stock": 2})], f"publish ({how})", cwd=tmp)
                check(not any(m in r.stderr for m in SANITIZER_MARKERS), f"publish ({how}): {r.stderr}")
                check("published" in r.stderr, f"publish ({how}) names the command it published: {r.stderr}")
                lines = r.stdout.strip().splitlines()
                eq(len(lines), 1, f"publish ({how}) prints one line, the result event")
                event = json.loads(lines[0])
                eq((event["type"], event["data"]["name"], event["data"]["status"]),
                   ("product.created", name, "DRAFT"), f"publish ({how}): the result event")
                eq(query("SELECT name, stock FROM products WHERE id = %s", event["data"]["productId"]),
                   [(name, 2)], f"publish ({how}): the command was applied")

            publish = builds["make (pkg-config)"]["publish"]
            r = run([publish, "-c", config, "createProduct", '{"name":"Negative","price":"-1"}'],
                    "publish (rejected)", cwd=tmp, ok=False)
            eq(r.returncode, 1, f"a rejected command exits 1 ({r.stderr})")
            event = json.loads(r.stdout.strip().splitlines()[0])
            eq((event["type"], event["data"]["code"]), ("command.rejected", "VALIDATION_FAILED"), "the rejection")
            r = run([publish, "-c", config, "noSuchCommand", "{}"], "publish (unknown type)", cwd=tmp, ok=False)
            eq((r.returncode, r.stdout), (5, ""), f"a type no queue routes exits 5, nothing sent ({r.stderr})")
            check("noSuchCommand" in r.stderr, f"the error names the type: {r.stderr}")
            r = run([publish], "publish (no arguments)", cwd=tmp, ok=False)
            eq(r.returncode, 2, "no arguments: usage, exit 2")
            r = run([publish, "--help"], "publish --help", cwd=tmp)
            check("Exit status" in r.stdout, "publish --help states the exit statuses")
            # the spool example (examples/c/spool.c; test_spool runs it from the build tree): with its
            # broker away it spools, then the next run sends what waits first
            spool, d = builds["cmake find_package"]["spool"], os.path.join(tmp, "spool")
            away = ({"CONVEYOR_RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:1"} if TRANSPORT == "rabbitmq"
                    else {"CONVEYOR_REDIS_URL": "redis://127.0.0.1:1/0"})
            r = run([spool, config, d, "2"], "spool (broker away)", cwd=tmp, env=away)
            check("published 2 (2 spooled)" in r.stdout and "waiting 2 records" in r.stdout, r.stdout)
            spooled = r.stdout.splitlines()[:2]
            r = run([spool, config, d, "1"], "spool (broker back)", cwd=tmp)
            check("published 1 (0 spooled)" in r.stdout and "waiting 0 records, 0 bytes, oldest -" in r.stdout,
                  r.stdout)
            check(not any(m in r.stderr for m in SANITIZER_MARKERS), f"spool: {r.stderr}")
            ids = spooled + r.stdout.splitlines()[:1]
            deadline = time.time() + 60
            while True:
                applied = query("SELECT count(*) FROM processed_commands WHERE id = ANY(%s::uuid[]) "
                                "AND outcome = 'applied'", ids)[0][0]
                if applied == 3 or time.time() > deadline:
                    break
                time.sleep(0.2)
            eq(applied, 3, "the two spooled commands and the third applied")
            eq(pool.stop(), (0, []), "clean stop")
