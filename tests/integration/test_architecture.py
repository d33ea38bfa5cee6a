"""docs/architecture.md holds: a command added in one place and forgotten in
another fails here, as does an include that crosses a layer, or a source file
the architecture page does not describe.

The command table of workers/handler.c is the one list of command types; for
every type in it there must be its handler, its prototype, one queue in
queues.conf (and the test harness's routing), a payload schema, an event schema
for every event it emits, a row in the README's command table with the codes it
can reject with, a section in docs/reference.md and in docs/contract.md, a test
that publishes it, and valid payloads in the poison corpus. Nothing here needs
the servers: it reads the repository."""
import json
import os
import re
import sys

import contract
from harness import ROOT, ROUTING, check, eq

sys.path.insert(0, os.path.join(ROOT, "tests", "poison"))
import corpus  # noqa: E402


def read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def c_sources(folder):
    return sorted(f for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith((".c", ".h")))


def handler_table():
    """[(type, function, runs_ahead)] of workers/handler.c's table."""
    block = re.search(r"handlers\[\]\s*=\s*\{(.*?)\n\};", read("workers", "handler.c"), re.S)
    check(block, "workers/handler.c: no `handlers[] = {...};` table")
    rows = []
    for entry in re.findall(r"\{([^{}]*)\}", block.group(1)):  # designated initialisers
        type_ = re.search(r'\.type\s*=\s*"(\w+)"', entry)
        fn = re.search(r"\.run\s*=\s*(\w+)", entry)
        check(type_ and fn, f"workers/handler.c: a row without .type or .run: {entry.strip()}")
        ahead = re.search(r"\.runs_ahead\s*=\s*(true|false)", entry)
        rows.append((type_.group(1), fn.group(1), ahead.group(1) if ahead else "false"))
    check(rows, "workers/handler.c: the table has no rows")
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
    eq(len(types), len(set(types)), "command types in workers/handler.c are unique")
    problems = []

    def need(cond, what):
        if not cond:
            problems.append(what)

    # the handler and its prototype
    workers_h = read("workers", "workers.h")
    files = {f: read("workers", f) for f in c_sources("workers") if f.endswith(".c")}
    handler_file = {}
    for type_, fn, _ in table:
        need(re.search(rf"^int {fn}\(struct cmd_ctx \*ctx\);", workers_h, re.M),
             f"{type_}: no prototype `int {fn}(struct cmd_ctx *ctx);` in workers/workers.h")
        defined = [f for f, text in files.items() if re.search(rf"^int {fn}\(struct cmd_ctx \*ctx\) \{{", text, re.M)]
        need(len(defined) == 1 and defined[0].startswith("handler_"),
             f"{type_}: {fn} must be defined in one workers/handler_*.c (found in {defined})")
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
    shared_events = emitted(files["handler.c"])  # helpers (stock.low, stock.depleted)
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


# What each layer may include (quoted includes; system headers are free).
MAY_INCLUDE = {
    "shared": {"core.h", "broker_backend.h"},
    "workers": {"workers.h", "core.h", "http.h"},
    "producer": {"conveyor.h", "core.h"},
    "bench": {"core.h"},
}


def test_layers_include_only_downward():
    problems = []
    for folder, allowed in MAY_INCLUDE.items():
        for f in c_sources(folder):
            for inc in re.findall(r'^#include "([^"]+)"', read(folder, f), re.M):
                if inc not in allowed:
                    problems.append(f"{folder}/{f} includes \"{inc}\" ({folder}/ may include {sorted(allowed)})")
    http_files = {"http.c", "dashboard.c", "http_action.c"}  # the HTTP child's own header
    for f in c_sources("workers"):
        if f not in http_files and "http.h" in re.findall(r'^#include "([^"]+)"', read("workers", f), re.M):
            problems.append(f"workers/{f} includes http.h (only the HTTP child's files {sorted(http_files)} may)")
    for f in c_sources("shared"):
        if "broker_backend.h" in re.findall(r'^#include "([^"]+)"', read("shared", f), re.M):
            if not f.startswith("broker"):
                problems.append(f"shared/{f} includes broker_backend.h (only broker.c and the backends may)")
    check('#include "' not in read("producer", "conveyor.h"), "producer/conveyor.h, the public header, must "
                                                             "include no Conveyor header")
    check(not problems, "\n".join(problems))


def test_architecture_page_describes_every_source_file():
    page = read("docs", "architecture.md")
    listed = set(re.findall(r"^\| `((?:shared|workers|producer)/[\w.]+)` \|", page, re.M))
    present = {f"{d}/{f}" for d in ("shared", "workers", "producer") for f in c_sources(d)}
    eq(sorted(present - listed), [], "source files docs/architecture.md's file table does not describe")
    eq(sorted(listed - present), [], "files docs/architecture.md's file table describes that do not exist")
