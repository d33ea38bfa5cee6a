"""The published contract (schemas/, JSON Schema draft 2020-12) as the tests use it:
every command they publish and every event they receive is checked against it."""
import json
import os

from jsonschema import Draft202012Validator

SCHEMAS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "schemas")
_validators = {}


def validator(relpath):
    """The validator of schemas/<relpath>, or None when there is no such schema."""
    if relpath not in _validators:
        path = os.path.join(SCHEMAS, relpath)
        if not os.path.exists(path):
            _validators[relpath] = None
        else:
            with open(path) as f:
                schema = json.load(f)
            Draft202012Validator.check_schema(schema)
            _validators[relpath] = Draft202012Validator(schema)
    return _validators[relpath]


def errors(relpath, instance):
    v = validator(relpath)
    if v is None:
        return [f"no schema {relpath}"]
    return [f"{relpath}: {'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in v.iter_errors(instance)]


def command_errors(env):
    """What makes a command envelope break the contract ([] when it keeps it)."""
    errs = errors("command.schema.json", env)
    t = env.get("type") if isinstance(env, dict) else None
    if isinstance(t, str) and validator(f"commands/{t}.schema.json") and isinstance(env.get("payload"), dict):
        errs += errors(f"commands/{t}.schema.json", env["payload"])
    return errs


def event_errors(ev):
    errs = errors("event.schema.json", ev)
    if isinstance(ev, dict) and isinstance(ev.get("type"), str):
        errs += errors(f"events/{ev['type']}.schema.json", ev.get("data"))
    return errs
