"""The reference page (docs/reference.md) cannot drift from the contract: every
JSON block in it keeps the schemas, every command and event type is shown, each
command's example events answer that command, and its rejection codes are the
ones the README's command table lists; and every link of the README and docs/
resolves inside the repository."""
import json
import os
import re
import tempfile

import contract
from harness import BIN, QUEUE_OF, ROOT, check, eq

REFERENCE = os.path.join(ROOT, "docs", "reference.md")


def sections():
    """{heading: text} of the level-2 sections of the reference page."""
    text = open(REFERENCE).read()
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {p.split("\n", 1)[0]: p for p in parts}


def json_lines(text):
    out = []
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.S):
        out += [json.loads(line) for line in block.splitlines() if line.strip()]
    return out


def test_reference_examples_keep_the_contract():
    problems, commands, events = [], set(), set()
    for heading, text in sections().items():
        for msg in json_lines(text):
            if "payload" in msg:
                commands.add(msg["type"])
                problems += [f"{heading}: {e}" for e in contract.command_errors(msg)]
            else:
                events.add(msg["type"])
                problems += [f"{heading}: {e}" for e in contract.event_errors(msg)]
    check(not problems, "\n".join(problems))
    eq(commands, set(QUEUE_OF), "command types shown")
    all_events = {f[:-len(".schema.json")] for f in os.listdir(os.path.join(contract.SCHEMAS, "events"))}
    eq(events, all_events, "event types shown")


def test_reference_matches_the_readme():
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = {}
    for line in readme.splitlines():
        m = re.match(r"\| `(\w+)` `\{.*\| (`[A-Z_]+`(?:, `[A-Z_]+`)*) \|$", line)
        if m:
            table[m.group(1)] = set(re.findall(r"[A-Z_]{4,}", m.group(2)))
    eq(set(table), set(QUEUE_OF), "commands in the README table")
    for type_, codes in table.items():
        heading = next((h for h in sections() if h.startswith(f"`{type_}`")), None)
        check(heading, f"no section for {type_}")
        text = sections()[heading]
        eq(f"queue `{QUEUE_OF[type_]}`" in heading, True, f"{type_}'s queue in the heading")
        listed = set(re.findall(r"^- `([A-Z_]+)`", text.split("Rejected with:")[1], flags=re.M))
        eq(listed, codes, f"rejection codes of {type_}")
        msgs = json_lines(text)
        cmd = [m for m in msgs if "payload" in m]
        eq(len(cmd), 1, f"one example command for {type_}")
        for ev in msgs:
            if "payload" not in ev:
                eq((ev["commandId"], ev["commandType"]), (cmd[0]["id"], type_), f"{type_}'s events answer it")


def test_links_resolve():
    """Every relative link of the README and docs/ names a file or folder of the
    repository, and none points outside it (a reader has only the repository)."""
    pages = [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
    problems = []
    for page in pages:
        text = re.sub(r"```.*?```", "", open(page).read(), flags=re.S)
        name = os.path.relpath(page, ROOT)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            if not path.startswith(ROOT + os.sep):
                problems.append(f"{name}: {target} is outside the repository")
            elif not os.path.exists(path):
                problems.append(f"{name}: {target} does not exist")
        if "DESIGN.md" in text:
            problems.append(f"{name}: refers to DESIGN.md, which a reader of the repository does not have")
    check(not problems, "\n".join(problems))


def test_compose_file_describes_the_scaled_out_topology():
    """docker/compose.yaml is valid (docker-compose config: no container engine
    runs here), holds the topology of docs/scaling.md, and its pools' queues.conf
    and environment pass conveyor-workers --check."""
    import subprocess
    compose = os.path.join(ROOT, "docker", "compose.yaml")
    r = subprocess.run(["docker-compose", "-f", compose, "config"], capture_output=True, text=True, timeout=60)
    eq(r.returncode, 0, f"docker-compose config: {r.stderr}")
    r = subprocess.run(["docker-compose", "-f", compose, "config", "--services"], capture_output=True, text=True,
                       timeout=60)
    services = set(r.stdout.split())
    want = {"postgres-primary", "postgres-standby", "rabbitmq-1", "rabbitmq-2", "rabbitmq-3", "redis-primary",
            "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3", "workers-a", "workers-b"}
    eq(services, want, "the services of the scaled-out topology")
    import yaml
    doc = yaml.safe_load(open(compose))
    for pool in ("workers-a", "workers-b"):
        env = doc["services"][pool]["environment"]
        nodes = env["CONVEYOR_RABBITMQ_URL"].split(",")
        eq(len(nodes), 3, f"{pool} lists the three RabbitMQ nodes")
        check("postgres-primary" in env["CONVEYOR_DATABASE_URL"] and "postgres-standby" in env["CONVEYOR_DATABASE_URL"]
              and "target_session_attrs=read-write" in env["CONVEYOR_DATABASE_URL"], f"{pool}: the multi-host URL")
        check(env["CONVEYOR_REDIS_URL"].startswith("redis-sentinel://"), f"{pool}: Redis through Sentinel")
        for transport in ("rabbitmq", "redis"):
            e = dict(os.environ, CONVEYOR_DATABASE_URL=env["CONVEYOR_DATABASE_URL"],
                     CONVEYOR_RABBITMQ_URL=env["CONVEYOR_RABBITMQ_URL"], CONVEYOR_REDIS_URL=env["CONVEYOR_REDIS_URL"],
                     CONVEYOR_TRANSPORT=transport)
            r = subprocess.run([os.path.join(os.environ.get("CONVEYOR_BIN_DIR", os.path.join(ROOT, "build")),
                                             "conveyor-workers"), "-c", os.path.join(ROOT, "docker", "queues.cluster.conf"),
                                "--check"], capture_output=True, text=True, env=e, timeout=30)
            eq(r.returncode, 0, f"{pool} on {transport}: --check ({r.stderr})")
            check("conveyor:***@rabbitmq-1" in r.stdout or transport == "redis", f"URLs shown masked: {r.stdout}")


def test_dockerfile_build_stage_builds_rabbitmq():  # faults (Release only: it builds its own Release tree either way)
    """The container image's build stage, run without a Docker engine: exactly
    what its COPY lines copy, in a clean folder, then its cmake configure and
    build of the same targets (scripts/docker_build_check.py). It failed while
    CMakeLists.txt needed bench/, which the stage does not copy. Once (it does
    not depend on the transport)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "docker_build_check.py")],
                       capture_output=True, text=True, timeout=900)
    print(r.stdout[-2000:])
    eq(r.returncode, 0, f"the Dockerfile's build stage fails:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    check("conveyor-workers" in r.stdout and "bench" not in r.stdout.split("copied:")[-1],
          f"the stage built its targets from what it copies (no bench/): {r.stdout[-500:]}")


def readme_section(text, heading):
    """The text of the README section whose heading line is heading (to the next heading)."""
    m = re.search(r"^#+ " + re.escape(heading) + r"\n(.*?)(?=^#+ |\Z)", text, flags=re.M | re.S)
    check(m, f"no section '{heading}' in the README")
    return m.group(1)


def test_docs_agree_with_each_other_and_the_tools_rabbitmq():
    """The dedup window, the 421 of a foreign Host, the produce progress line and
    the exit-status rule are stated, and the same, in docs/contract.md, the
    README and the tools' --help; the configuration takes the smallest window the
    docs state and refuses less. Once (no transport in it)."""
    import subprocess
    contract_md = open(os.path.join(ROOT, "docs", "contract.md")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    # the dedup window: pruned after the window, the smallest stated in both, and enforced
    check("none is pruned" not in contract_md, "contract.md still says no command id is pruned")
    for name, text in (("contract.md", contract_md), ("README", readme)):
        check(re.search(r"at least 1 day", text), f"{name} states the smallest dedup window (at least 1 day)")
        check("applied again" in text, f"{name} says a replay after the window is applied again")
    for days, status in ((1, 0), (0, 0), (-1, 2), (36501, 2)):
        fd, path = tempfile.mkstemp(suffix=".conf")
        with os.fdopen(fd, "w") as f:
            f.write(open(os.path.join(ROOT, "queues.conf")).read().replace("retention_days = 30;",
                                                                           f"retention_days = {days};"))
        try:
            r = subprocess.run([os.path.join(BIN, "conveyor-workers"), "-c", path, "--check"], capture_output=True,
                               text=True, timeout=60)
        finally:
            os.unlink(path)
        eq(r.returncode, status, f"dedup.retention_days = {days}: --check exit status ({r.stderr})")
    # HTTP: the 421 where the README describes the listener
    http = readme_section(readme, "Metrics and health")
    check("421" in http and "Host" in http, "the README's HTTP section states the 421 for a foreign Host")
    # conveyor-produce's progress line and summary: in --help and in the README
    helptext = subprocess.run([os.path.join(BIN, "conveyor-produce"), "--help"], capture_output=True,
                              text=True).stdout
    check("progress line" in helptext and "summary" in helptext, "produce --help: progress line and summary")
    check("progress line" in readme and "published in" in readme, "the README describes produce's progress line")
    # one exit-status rule, in the README, and every --help agrees with it
    rule = readme_section(readme, "Exit status")
    check("**2 is configuration**" in rule and "**3 is unreachable**" in rule, "the README states the rule")
    tls = readme_section(readme, "TLS")
    check("exit 3" not in tls and "exits 2" in tls, "the TLS section follows the rule (a certificate: 2)")
    for b in ("conveyor-workers", "conveyor-produce", "conveyor-admin", "conveyor-subscribe"):
        h = subprocess.run([os.path.join(BIN, b), "--help"], capture_output=True, text=True).stdout
        flat = " ".join(h.split())
        check("2 usage or configuration error" in flat and "TLS certificate a server refused" in flat,
              f"{b} --help: 2 is configuration, a refused TLS certificate included:\n{h}")
        if b != "conveyor-workers":
            check("3 the broker" in flat or "3 a broker" in flat, f"{b} --help: 3 is unreachable:\n{h}")
    admin_help = subprocess.run([os.path.join(BIN, "conveyor-admin"), "--help"], capture_output=True, text=True).stdout
    check("before or after the subcommand" in admin_help, "conveyor-admin --help: options anywhere")


def test_every_admin_subcommand_is_in_the_readme():
    """Each subcommand conveyor-admin --help lists (its words before the first
    argument: "dead list", "schedules pause") is shown in the README as
    `conveyor-admin <words>`."""
    import subprocess
    readme = open(os.path.join(ROOT, "README.md")).read()
    h = subprocess.run([os.path.join(BIN, "conveyor-admin"), "--help"], capture_output=True, text=True).stdout
    subcommands = []
    for line in h.splitlines():
        m = re.match(r"(?:usage:)?\s*conveyor-admin \[OPTIONS\] (.*)$", line)
        if m:
            words = []
            for w in m.group(1).split():
                if not re.fullmatch(r"[a-z]+", w):
                    break
                words.append(w)
            subcommands.append(" ".join(words))
    check(len(subcommands) >= 8, f"the usage lines of conveyor-admin --help: {subcommands}")
    missing = [c for c in subcommands if f"conveyor-admin {c}" not in readme]
    eq(missing, [], "conveyor-admin subcommands of --help the README does not show")
