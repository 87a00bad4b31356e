"""The config's schema check, one readable line per problem, before any job starts (the cross-field checks the
schema cannot express follow in :mod:`pmoe_backdoor.study_checks`).

Snakemake's ``validate`` reports a schema violation as the whole failing sub-schema and instance (hundreds of
lines for a one-letter typo). :func:`validate_config` runs it unchanged (it also fills in the schema's defaults)
and, when it fails, raises instead one line naming the key by its dotted path, e.g.
``config: unknown key 'train.epoch' (did you mean 'train.epochs'?)``.
"""

from __future__ import annotations

import difflib
import json
import os
from typing import Any, Iterable

TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
              "object": "a mapping (key: value)", "array": "a list", "null": "null"}
BOUNDS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}


class ConfigError(ValueError):
    """A config that does not fit the schema; the message is one line."""


def dotted(path: Iterable[Any]) -> str:
    """``['attack', 'rates', 2]`` as ``attack.rates[2]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _join(*parts: Any) -> str:
    return dotted(p for p in parts if p != "")


def _show(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it in YAML, shortened."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, bool) or value is None:
        text = json.dumps(value)
    else:
        text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _kind(value: Any) -> str:
    """What a value is, in the schema's words."""
    for typ, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                      (dict, "a mapping"), (list, "a list")):
        if isinstance(value, typ):
            return name
    return "null" if value is None else type(value).__name__


def _suggest(word: str, choices: Iterable[str]) -> str | None:
    hits = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return hits[0] if hits else None


def _unknown_keys(error: Any) -> str:
    schema, where = error.schema, list(error.absolute_path)
    allowed = list(schema.get("properties", {}))
    extras = [k for k in error.instance if k not in allowed]
    parts = []
    for key in extras:
        hint = _suggest(str(key), allowed)
        tail = f"did you mean {_join(*where, hint)!r}?" if hint else f"valid keys here: {', '.join(allowed)}"
        parts.append(f"unknown key {_join(*where, key)!r} ({tail})")
    return "; ".join(parts) or error.message


def _expected(error: Any) -> str:
    """What the schema wanted, as a phrase: 'an integer', 'one of 'fp32', 'bf16'', 'a number >= 1'."""
    validator, value, schema = error.validator, error.validator_value, error.schema
    if validator == "type":
        types = value if isinstance(value, list) else [value]
        return " or ".join(TYPE_NAMES.get(t, t) for t in types)
    if validator == "enum":
        return "one of " + ", ".join(_show(v) for v in value)
    if validator == "const":
        return _show(value)
    if validator in BOUNDS:
        noun = "an integer" if schema.get("type") == "integer" else "a number"
        return f"{noun} {BOUNDS[validator]} {value:g}"
    if validator == "minItems":
        return f"a list of at least {value} item{'s' * (value != 1)}"
    if validator == "maxItems":
        return f"a list of at most {value} item{'s' * (value != 1)}"
    if validator == "uniqueItems":
        return "a list without repeated items"
    if validator == "minProperties":
        return f"at least {value} entr{'ies' if value != 1 else 'y'}"
    return ""


def describe(error: Any) -> str:
    """One line for a ``jsonschema.ValidationError``."""
    path = list(error.absolute_path)
    where = dotted(path) or "the top level"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        return f"config: {_unknown_keys(error)}"
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        key = missing[0] if missing else error.message
        return f"config: missing required key {_join(*path, key)!r}"
    expected = _expected(error)
    if not expected:
        message = " ".join(error.message.split())
        return f"config: {where}: {message[:200]}"
    got = _show(error.instance)
    if error.validator == "type":
        got += f" ({_kind(error.instance)})"
    line = f"config: {where}: expected {expected}, got {got}"
    if error.validator == "enum" and isinstance(error.instance, str):
        hint = _suggest(error.instance, error.validator_value)
        line += f" (did you mean {hint!r}?)" if hint else ""
    return line


def first_problem(config: dict, schema: dict) -> Any | None:
    """The error to report: an unknown key before anything else (a typo also makes the key it meant look
    missing), else the first error in the document's order."""
    from jsonschema import Draft202012Validator

    errors = list(Draft202012Validator(schema).iter_errors(config))
    unknown = [e for e in errors if e.validator == "additionalProperties"]
    return (unknown or errors or [None])[0]


def validate_config(config: dict, schema_path: str | os.PathLike) -> None:
    """Snakemake's ``validate`` (defaults filled in from the schema), failing with a one-line ConfigError."""
    import yaml
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, os.fspath(schema_path))
    except WorkflowError as exc:
        with open(schema_path) as fh:
            schema = yaml.safe_load(fh)
        error = first_problem(config, schema) or exc.__context__
        if error is None or not hasattr(error, "validator"):
            raise
        raise ConfigError(describe(error)) from None
