"""docs/architecture.md holds: a command added in one place and forgotten in
another fails here, as does an include that crosses a layer or a room, a C file
of workers/ outside its three rooms, or a source file the architecture page does
not describe.

The command table of workers/domain/handler.c is the one list of command types;
for every type in it there must be its handler, its prototype, one queue in
queues.conf (and the test harness's routing), a payload schema, an event schema
for every event it emits, a row in the README's command table with the codes it
can reject with, a section in docs/reference.md and in docs/contract.md, a test
that publishes it, and valid payloads in the poison corpus.

The rooms of workers/ (domain/, http/, the pool in workers/ itself) and what
each may include are those of the page's "Layers" section; the include rules
are checked on the #include "..." lines of the files (system headers are free),
and that http/ calls no function of domain/.

Nothing here needs the servers or a build: it reads the repository only. So
SERVERS = False below: tests/CMakeLists.txt runs each case once (not once per
transport, as integration.none.test_architecture.<case>) and outside the
conveyor_suite fixture (no secrets scan), and run.py skips harness.setup()."""
import json
import os
import re
import sys

import contract
from harness import ROOT, ROUTING, check, eq

SERVERS = False  # read by tests/CMakeLists.txt and run.py: see the docstring

sys.path.insert(0, os.path.join(ROOT, "tests", "poison"))
import corpus  # noqa: E402


def read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def c_sources(folder):
    return sorted(f for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith((".c", ".h")))


def c_tree(folder):
    """Every .c and .h file under folder, recursively, as paths relative to ROOT."""
    out = []
    for d, _, names in os.walk(os.path.join(ROOT, folder)):
        out += [os.path.relpath(os.path.join(d, f), ROOT) for f in names if f.endswith((".c", ".h"))]
    return sorted(out)


def includes(path):
    """The quoted includes of a file (#include "x.h"), in order."""
    return re.findall(r'^\s*#\s*include\s+"([^"]+)"', read(path), re.M)


DOMAIN = os.path.join("workers", "domain")
HTTP = os.path.join("workers", "http")


def handler_table():
    """[(type, function, runs_ahead)] of workers/domain/handler.c's table."""
    block = re.search(r"handlers\[\]\s*=\s*\{(.*?)\n\};", read(DOMAIN, "handler.c"), re.S)
    check(block, "workers/domain/handler.c: no `handlers[] = {...};` table")
    rows = []
    for entry in re.findall(r"\{([^{}]*)\}", block.group(1)):  # designated initialisers
        type_ = re.search(r'\.type\s*=\s*"(\w+)"', entry)
        fn = re.search(r"\.run\s*=\s*(\w+)", entry)
        check(type_ and fn, f"workers/domain/handler.c: a row without .type or .run: {entry.strip()}")
        ahead = re.search(r"\.runs_ahead\s*=\s*(true|false)", entry)
        rows.append((type_.group(1), fn.group(1), ahead.group(1) if ahead else "false"))
    check(rows, "workers/domain/handler.c: the table has no rows")
    return rows


def queues_conf_routing():
    """{queue: [types]} of the repository's queues.conf."""
    text = re.sub(r"#.*", "", read("queues.conf"))
    out = {}
    for entry in re.findall(r"\{([^{}]*commands\s*=\s*\[[^\]]*\][^{}]*)\}", text):
        name = re.search(r'name\s*=\s*"(\w+)"', entry)
        check(name, f"queues.conf: a queue without a name: {entry.strip()}")
        out[name.group(1)] = re.findall(r'"(\w+)"', re.search(r"commands\s*=\s*\[([^\]]*)\]", entry).group(1))
    check(out, "queues.conf: no queue found")
    return out


def emitted(text):
    return set(re.findall(r'ctx_emit\(\s*&?ctx\s*,\s*"([\w.]+)"', text))


def rejection_codes(text):
    return set(re.findall(r'ctx_reject\(\s*ctx\s*,\s*"([A-Z_]+)"', text))


def sections(text, level):
    """{heading: body} of the sections of a Markdown text at a heading level (and
    above: a section ends at the next heading of its level or higher)."""
    parts = re.split(rf"^#{{1,{level}}} ", text, flags=re.M)[1:]
    return {p.split("\n", 1)[0]: p for p in parts}


def test_every_command_is_complete():
    table = handler_table()
    types = [t for t, _, _ in table]
    eq(len(types), len(set(types)), "command types in workers/domain/handler.c are unique")
    problems = []

    def need(cond, what):
        if not cond:
            problems.append(what)

    # the handler and its prototype
    domain_h = read(DOMAIN, "domain.h")
    files = {f: read(f) for f in c_tree("workers") if f.endswith(".c")}  # by path: workers/domain/handler.c
    handler_file = {}
    for type_, fn, _ in table:
        need(re.search(rf"^int {fn}\(struct cmd_ctx \*ctx\);", domain_h, re.M),
             f"{type_}: no prototype `int {fn}(struct cmd_ctx *ctx);` in workers/domain/domain.h")
        defined = [f for f, text in files.items() if re.search(rf"^int {fn}\(struct cmd_ctx \*ctx\) \{{", text, re.M)]
        need(len(defined) == 1 and os.path.dirname(defined[0]) == DOMAIN
             and os.path.basename(defined[0]).startswith("handler_"),
             f"{type_}: {fn} must be defined in one workers/domain/handler_*.c (found in {defined})")
        if defined:
            handler_file[type_] = files[defined[0]]

    # routing: queues.conf, the harness, and nothing without a handler
    conf = queues_conf_routing()
    routed = [t for ts in conf.values() for t in ts]
    for type_ in types:
        need(routed.count(type_) == 1, f"{type_}: queues.conf must route it to exactly one queue "
                                       f"(routed {routed.count(type_)} times)")
    need(not set(routed) - set(types), f"queues.conf routes types with no handler: {sorted(set(routed) - set(types))}")
    need(conf == ROUTING, f"tests/integration/harness.py ROUTING {ROUTING} differs from queues.conf {conf}")
    queue_of = {t: q for q, ts in conf.items() for t in ts}

    # schemas: one per payload, one per event emitted anywhere, none left over
    command_schemas = {f[:-len(".schema.json")] for f in os.listdir(os.path.join(contract.SCHEMAS, "commands"))}
    need(command_schemas == set(types), f"schemas/commands/ {sorted(command_schemas)} against the handlers "
                                        f"{sorted(types)}")
    shared_events = emitted(files[os.path.join(DOMAIN, "handler.c")])  # helpers (stock.low, stock.depleted)
    all_events = set().union(*(emitted(t) for t in files.values()))
    event_schemas = {f[:-len(".schema.json")] for f in os.listdir(os.path.join(contract.SCHEMAS, "events"))}
    need(event_schemas == all_events, f"schemas/events/ {sorted(event_schemas)} against the events workers/ emits "
                                      f"{sorted(all_events)}")
    for type_, text in handler_file.items():
        own = emitted(text)
        need(own, f"{type_}: its handler emits no event with ctx_emit")
        if "emit_stock_notifications(" in text:
            own |= shared_events
        for ev in own:
            need(ev in event_schemas, f"{type_}: no schemas/events/{ev}.schema.json")

    # the README's command table: the rejection codes the handler can return
    readme_rows = {}
    for line in read("README.md").splitlines():
        m = re.match(r"\| `(\w+)` `\{.*\| (`[A-Z_]+`(?:, `[A-Z_]+`)*) \|$", line)
        if m:
            readme_rows[m.group(1)] = set(re.findall(r"`([A-Z_]+)`", m.group(2)))
    need(set(readme_rows) == set(types), f"README command table {sorted(readme_rows)} against the handlers")
    codes = {t: {"VALIDATION_FAILED"} | rejection_codes(text) for t, text in handler_file.items()}
    for type_ in types:
        if type_ in readme_rows and type_ in codes:
            need(readme_rows[type_] == codes[type_], f"{type_}: README lists {sorted(readme_rows[type_])}, its "
                                                     f"handler rejects with {sorted(codes[type_])}")

    # a section in the reference and in the contract, named with its queue
    reference = sections(read("docs", "reference.md"), 2)
    contract_md = read("docs", "contract.md")
    contract_sections = sections(contract_md, 3)
    known_codes = set(re.findall(r"^\| `([A-Z_]+)` \|", contract_md, re.M))
    for type_ in types:
        heading = f"`{type_}` (queue `{queue_of.get(type_)}`)"
        need(heading in reference, f"docs/reference.md: no section '## {heading}'")
        need(heading in contract_sections, f"docs/contract.md: no section '### {heading}'")
        if heading in contract_sections and type_ in codes:
            listed = set(re.findall(r"`([A-Z_]+)`", contract_sections[heading].split("Rejected", 1)[-1]))
            need(listed & known_codes == codes[type_], f"docs/contract.md {type_}: rejected with "
                                                       f"{sorted(listed & known_codes)}, its handler with "
                                                       f"{sorted(codes[type_])}")
        need(re.search(rf"^\| `{queue_of.get(type_)}` \|.*`{type_}`", contract_md, re.M),
             f"docs/contract.md: the default routing table does not put {type_} in {queue_of.get(type_)}")

    # a test that publishes it, and the poison corpus
    tests = "".join(read("tests", "integration", f) for f in os.listdir(os.path.join(ROOT, "tests", "integration"))
                    if f.startswith("test_") and f.endswith(".py") and f != "test_architecture.py")
    in_corpus = {str(json.loads(e["text"]).get("type")) for e in corpus.load() if "text" in e and _is_json(e["text"])}
    for type_ in types:
        need(re.search(rf'envelope\(\s*"{type_}"', tests), f"{type_}: no tests/integration/test_*.py publishes "
                                                           f'envelope("{type_}", ...)')
        need(type_ in corpus.VALID, f"{type_}: no valid payload in tests/poison/corpus.py VALID")
        need(type_ in in_corpus, f"{type_}: tests/poison/corpus.jsonl has no message of this type")
    try:
        written = [json.dumps(e) for e in corpus.entries()]
    except KeyError as e:
        written = None
        problems.append(f"tests/poison/corpus.py cannot write the corpus: no VALID payload for {e}")
    need(written is None or written == read("tests", "poison", "corpus.jsonl").splitlines(),
         "tests/poison/corpus.jsonl is not what corpus.py writes: run tests/poison/corpus.py --write")

    check(not problems, "a command is missing from some places (docs/architecture.md, \"How to add a "
                        "command\"):\n  " + "\n  ".join(problems))


def _is_json(text):
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):  # the corpus holds broken and deeply nested JSON
        return False


# What each folder may include (quoted includes; system headers are free). The
# rows of workers/ are its three rooms; docs/architecture.md's "Layers" table
# states the same sets (test_the_page_states_these_include_rules).
MAY_INCLUDE = {
    "shared": {"core.h", "broker_backend.h"},
    "workers/domain": {"domain.h", "core.h"},
    "workers": {"workers.h", "domain.h", "core.h"},
    "workers/http": {"http.h", "workers.h", "domain.h", "core.h"},
    "producer": {"conveyor.h", "core.h"},
    "bench": {"core.h", "conveyor.h"},
}
ROOMS = ("workers/domain", "workers", "workers/http")
# Not on the page's table (they are not source folders), held to the same idea:
# conveyor_domain's tests and the fuzz target see the domain, never the pool.
TEST_MAY_INCLUDE = {
    "tests/unit": {"test.h", "core.h", "domain.h"},
    "tests/fuzz": {"domain.h"},
}
# The one unit test of the pool's room: its pure piece, the batch's lock order.
TEST_FILE_MAY_INCLUDE = {"tests/unit/test_batch_order.c": {"test.h", "workers.h"}}
# A broker backend in several files (issue 22) shares one private header among
# its pieces, and nothing else sees it: header -> (the backend's broker_*.c, the
# prefix of its other pieces). The header includes broker_backend.h for them.
PRIVATE_HEADERS = {
    "redis_internal.h": ("broker_redis.c", "redis_"),
    "amqp_internal.h": ("broker_amqp.c", "amqp_"),
    # not a backend: the readers of queues.conf's lists share their field reader
    "cfg_field.h": ("cfg.c", "cfg_"),
}
# producer/'s private headers, each seen by its pieces only.
PRODUCER_PRIVATE = {"spool.h": ("client.c", "spool.c"),
                    # durable subscriptions: the API and its registry; the CLI's durable modes
                    "subscription_internal.h": ("subscription.c", "subscription_registry.c"),
                    "durable.h": ("subscribe.c", "durable_subscription.c")}


def private_headers_of(f):
    """The private headers shared/f may include (it is one of that backend's pieces)."""
    return {h for h, (backend, prefix) in PRIVATE_HEADERS.items()
            if f != h and (f == backend or f.startswith(prefix))}


def test_layers_include_only_downward():
    problems = []
    for folder, allowed in list(MAY_INCLUDE.items()) + list(TEST_MAY_INCLUDE.items()):
        for f in c_sources(folder):
            path = os.path.join(folder, f)
            own = private_headers_of(f) if folder == "shared" else set()
            if folder == "producer":
                own = {h for h, files in PRODUCER_PRIVATE.items() if f in files and f != h}
            for inc in includes(path):
                if inc not in TEST_FILE_MAY_INCLUDE.get(path, allowed) | own:
                    problems.append(f"{folder}/{f} includes \"{inc}\" ({folder}/ may include {sorted(allowed | own)})")
    for f in c_sources("shared"):
        if "broker_backend.h" in includes(os.path.join("shared", f)):
            if not f.startswith("broker") and f not in PRIVATE_HEADERS:
                problems.append(f"shared/{f} includes broker_backend.h (only broker.c, the backends and their "
                                "private headers may)")
    # the headers' own chain: domain.h sees core.h only, workers.h the domain, http.h the pool
    for header, want in (("workers/domain/domain.h", ["core.h"]), ("workers/workers.h", ["domain.h"]),
                         ("workers/http/http.h", ["workers.h"])):
        if includes(header) != want:
            problems.append(f"{header} includes {includes(header)}, expected {want}")
    # the embedded assets (cmake/embed_assets.cmake writes a C file of the http/ room)
    gen = re.findall(r'#include \\"([^"\\]+)\\"', read("cmake", "embed_assets.cmake"))
    if gen != ["http.h"]:
        problems.append(f"cmake/embed_assets.cmake: the generated file includes {gen}, expected [\"http.h\"]")
    check('#include "' not in read("producer", "conveyor.h"), "producer/conveyor.h, the public header, must "
                                                             "include no Conveyor header")
    check(not problems, "\n".join(problems))


def test_workers_has_three_rooms():
    """Every C file of workers/ is in one of its rooms; the domain room holds the
    rules, the table and the handlers (and every handler is there); nothing but
    the HTTP room's files includes http.h (the rules above), and the HTTP room
    calls no function of the domain (the JSON helpers they share are in shared/)."""
    problems = []
    for path in c_tree("workers"):
        if os.path.dirname(path) not in ROOMS:
            problems.append(f"{path} is in none of the rooms of workers/ {list(ROOMS)} (docs/architecture.md, Layers)")
    domain = set(c_sources(DOMAIN))
    want = {"domain.h", "validate.c", "handler.c"}
    if not want <= domain:
        problems.append(f"workers/domain/ lacks {sorted(want - domain)}")
    for f in sorted(domain - want):
        if not re.fullmatch(r"handler_\w+\.c", f):
            problems.append(f"workers/domain/{f}: the domain room holds domain.h, validate.c, handler.c, handler_*.c")
    for path in c_tree("workers"):
        if os.path.basename(path).startswith("handler") and os.path.dirname(path) != DOMAIN:
            problems.append(f"{path}: a handler outside workers/domain/")
    # the functions domain/ defines (not static), and any call to one from http/
    defined = set()
    for f in domain:
        if f.endswith(".c"):
            defined |= set(re.findall(r"^(?!static\b)[A-Za-z_][\w \*]*?\b(\w+)\([^;]*?\)\s*\{",
                                      read(DOMAIN, f), re.M))
    check(defined, "workers/domain/: no function definitions found (the pattern is wrong?)")
    for f in c_sources(HTTP):
        text = re.sub(r"/\*.*?\*/", "", read(HTTP, f), flags=re.S)
        called = sorted(fn for fn in defined if re.search(rf"\b{fn}\s*\(", text))
        if called:
            problems.append(f"workers/http/{f} calls into workers/domain/: {called}")
    check(not problems, "\n".join(problems))


def test_the_page_states_these_include_rules():
    """The "may include" column of docs/architecture.md's Layers table names the
    headers MAY_INCLUDE allows, folder by folder."""
    page = read("docs", "architecture.md")
    stated = {}
    for m in re.finditer(r"^\| `([\w/]+)/` \| [^|]* \| ([^|]*) \| [^|]* \|$", page, re.M):
        stated[m.group(1)] = set(re.findall(r"`([\w.]+\.h)`", m.group(2)))
    for folder, allowed in MAY_INCLUDE.items():
        check(folder in stated, f"docs/architecture.md: the Layers table has no row `{folder}/`")
        want = allowed | (set(PRIVATE_HEADERS) if folder == "shared" else set())  # a backend's pieces
        want |= set(PRODUCER_PRIVATE) if folder == "producer" else set()
        eq(sorted(stated[folder]), sorted(want), f"docs/architecture.md, Layers: what {folder}/ may include")


def test_architecture_page_describes_every_source_file():
    page = read("docs", "architecture.md")
    listed = set(re.findall(r"^\| `((?:shared|workers|producer)/[\w./]+\.[ch])` \|", page, re.M))
    present = set(c_tree("shared") + c_tree("workers") + c_tree("producer"))
    eq(sorted(present - listed), [], "source files docs/architecture.md's file table does not describe")
    eq(sorted(listed - present), [], "files docs/architecture.md's file table describes that do not exist")


def _code_only(text):
    """text with its comments, string and character literals blanked (newlines
    kept, so line numbers stay right)."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r'/\*.*?\*/|//[^\n]*|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', blank, text, flags=re.S)


def test_one_error_channel():
    """Issue 22, point 4: a function of shared/ or workers/ returns 0, a CV_E*
    class, a count >= 0 or a class, a pointer or a bool; never a bare -1 (which
    is numerically CV_ERETRY, a class its callers would act on). main() may
    return exit statuses. The run-ahead handshake is no error code (CV_EAHEAD is
    gone: workers/domain/domain.h, ctx->paused), and cv_strerror, beside the
    classes in shared/core.h, names every one of them."""
    problems = []
    for path in c_tree("shared") + c_tree("workers"):
        lines = _code_only(read(path)).split("\n")
        function = None
        for n, line in enumerate(lines, 1):
            # a definition (or prototype) starts at column 0 in this code base
            m = re.match(r"[A-Za-z_][\w \*]*?\b(\w+)\s*\(", line)
            if m and not line.startswith(("typedef", "struct", "enum", "union")):
                function = m.group(1)
            if re.search(r"\breturn\s*\(?\s*-\s*1\s*\)?\s*;", line) and function != "main":
                problems.append(f"{path}:{n}: return -1 in {function}() (return a CV_E* class, a bool, "
                                "or an enum of its own: docs/architecture.md, Conventions)")
    for path in c_tree("shared") + c_tree("workers") + c_tree("producer") + c_tree("tests"):
        if "CV_EAHEAD" in read(path):
            problems.append(f"{path}: CV_EAHEAD is back (running ahead is ctx->paused, not an error code)")
    core = read("shared", "core.h")
    classes = re.search(r"enum \{\s*(CV_OK = 0,.*?)\};", core, re.S)
    check(classes, "shared/core.h: the enum of the CV_E* classes is not found")
    names = re.findall(r"\b(CV_\w+)\s*=", classes.group(1))
    strerror = re.search(r"cv_strerror\(int code\) \{(.*?)\n\}", core, re.S)
    check(strerror, "shared/core.h: cv_strerror is not defined beside the classes")
    for name in names:
        if not re.search(rf"case {name}:\s*return \"", strerror.group(1)):
            problems.append(f"shared/core.h: cv_strerror does not name {name}")
    check(not problems, "\n".join(problems))


DEFINITION = re.compile(r"^(?!static\b)[A-Za-z_][\w \t\*]*?\b([a-z_]\w*)\s*\([^;{]*\)\s*\{", re.M)
CALL = re.compile(r"\b([a-z_]\w*)\s*\(")


def _scc(graph):
    """The strongly connected components of graph (node -> set of nodes) with
    more than one node: the circles."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_circles_between_files_or_folders():
    """No two C files call each other in a circle (A calls a function that only B
    defines, and B, through any chain, one that only A defines), and no two
    folders do (docs/architecture.md, "Layers"). Read from the sources: the
    non-static definitions of each file and the names it calls."""
    files = [f for folder in ("shared", "workers", "producer") for f in c_tree(folder) if f.endswith(".c")]
    code = {f: _code_only(read(f)) for f in files}
    defined = {}
    for f, text in code.items():
        for name in DEFINITION.findall(text):
            defined.setdefault(name, set()).add(f)
    check(len(defined) > 100, f"the definitions were read ({len(defined)} names)")
    # a name defined in several files (conveyor-admin and conveyor-workers each have a main) ties none
    owner = {name: next(iter(fs)) for name, fs in defined.items() if len(fs) == 1}
    graph = {f: set() for f in files}
    for f, text in code.items():
        for name in set(CALL.findall(text)):
            g = owner.get(name)
            if g and g != f:
                graph[f].add(g)
    check(sum(len(v) for v in graph.values()) > 100, "the calls between files were read")
    circles = _scc(graph)
    check(not circles, "files that call each other in a circle:\n  " + "\n  ".join(" <-> ".join(c) for c in circles))
    # Folders: the supervisor starts the HTTP child (http_run, declared in
    # workers.h beside worker_run and relay_run): the one call from the pool's
    # room into http/, and the one edge the folders' graph leaves out.
    into_http = sorted((f, g) for f, targets in graph.items() for g in targets
                       if os.path.dirname(g) == HTTP and os.path.dirname(f) != HTTP)
    eq(into_http, [(os.path.join("workers", "supervisor.c"), os.path.join(HTTP, "http.c"))],
       "calls into workers/http/ from outside it (only the supervisor's start of the child)")
    folders = {}
    for f, targets in graph.items():
        for g in targets:
            if os.path.dirname(f) != os.path.dirname(g) and (f, g) not in into_http:
                folders.setdefault(os.path.dirname(f), set()).add(os.path.dirname(g))
    circles = _scc(folders)
    check(not circles, "folders that call each other in a circle:\n  " + "\n  ".join(" <-> ".join(c) for c in circles))
