"""The resume cache: one file per finished claim, checked before it is trusted.

Each ``.lab-partial/<claim>.json`` holds the run configuration it was made
under, that configuration's hash, and the claim's result. ``--resume`` uses a
file only if its configuration equals this run's (else it says what differs)
and its result passes :func:`problems`: the schema below, and every recorded
check re-decided from its own numbers.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .verdicts import NOT_APPLICABLE, RULES, VERDICTS, Check, combine, criterion

SCHEMA = 2
FIGURE_TYPES = ("line", "dots")

#: Top-level fields of a claim's result and their JSON types.
RESULT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "key": str,
    "title": str,
    "quote": str,
    "method": str,
    "verdict": str,
    "criterion": str,
    "headline": str,
    "note": str,
    "checks": list,
    "numbers": list,
    "tables": list,
    "series": dict,
    "figures": list,
}
SCALAR = (str, numbers.Real, type(None))


class CacheError(Exception):
    """A cache file ``--resume`` refuses; the message is one line."""


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def entry(config: dict[str, Any], result: dict[str, Any]) -> str:
    return json.dumps(
        {
            "schema": SCHEMA,
            "config": config,
            "config_hash": config_hash(config),
            "result": result,
        }
    )


def load(path: Path, key: str, config: dict[str, Any]) -> dict[str, Any]:
    """The cached result of ``key`` made under ``config``, or :class:`CacheError`."""
    return read(path, config, lambda result: problems(result, key))


def read(path: Path, config: dict[str, Any], check: Callable[[Any], list[str]]) -> Any:
    """The cached result in ``path`` made under ``config`` that ``check`` finds no
    problem in, or :class:`CacheError`."""
    again = "run without --resume to start over"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CacheError(f"--resume: {path} is not UTF-8 text; {again}") from None
    except json.JSONDecodeError as error:
        raise CacheError(
            f"--resume: {path} is not valid JSON (line {error.lineno}: {error.msg}); "
            f"{again}"
        ) from None
    except OSError as error:
        raise CacheError(
            f"--resume: cannot read {path} ({error.strerror}); {again}"
        ) from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        found = document.get("schema") if isinstance(document, dict) else None
        raise CacheError(
            f"--resume: {path} is not a cache file of this lab (schema {found!r}, "
            f"this lab writes {SCHEMA}); {again}"
        )
    made = document.get("config")
    if not isinstance(made, dict) or document.get("config_hash") != config_hash(made):
        raise CacheError(
            f"--resume: {path} does not match its own configuration hash (it was "
            f"edited or damaged); {again}"
        )
    if made != config:
        raise CacheError(
            f"--resume: {path.name} was made with {differences(made, config)}; "
            f"resume with the same options, or {again}"
        )
    result = document.get("result")
    found = check(result)
    if found:
        raise CacheError(f"--resume: {path} fails the schema ({found[0]}); {again}")
    return result


def differences(made: dict[str, Any], now: dict[str, Any]) -> str:
    """``seed 1 (this run: 2), quick True (this run: False)``."""
    keys = sorted(set(made) | set(now))
    return ", ".join(
        f"{k} {made.get(k)!r} (this run: {now.get(k)!r})"
        for k in keys
        if made.get(k) != now.get(k)
    )


def problems(result: Any, key: str) -> list[str]:
    """What is wrong with a claim's result, first problem first; [] if nothing."""
    if not isinstance(result, dict):
        return ["the result is not an object"]
    out = [
        f"field {name!r} is missing or not {_name(kind)}"
        for name, kind in RESULT_FIELDS.items()
        if not isinstance(result.get(name), kind)
    ]
    if out:
        return out
    if result["key"] != key:
        return [f"it holds claim {result['key']!r}, not {key!r}"]
    if result["verdict"] not in VERDICTS:
        return [f"unknown verdict {result['verdict']!r}"]
    out += _check_records(result)
    out += _scalar_records(result["numbers"], "numbers", ("label", "unit"))
    for table in result["tables"]:
        if not isinstance(table, dict) or not isinstance(table.get("title"), str):
            out.append("a table without a title")
            continue
        columns = table.get("columns")
        if not isinstance(columns, list) or not all(
            isinstance(c, dict) and {"key", "label"} <= set(c) for c in columns
        ):
            out.append(f"table {table['title']!r} has malformed columns")
        out += _scalar_records(table.get("rows"), f"table {table['title']!r}", ())
    for name, values in result["series"].items():
        if not isinstance(values, list) or not all(
            v is None or _is_number(v) for v in values
        ):
            out.append(f"series {name!r} is not a list of numbers")
    for figure in result["figures"]:
        if not isinstance(figure, dict) or figure.get("type") not in FIGURE_TYPES:
            out.append("a figure of unknown type")
        elif not all(isinstance(figure.get(k), str) for k in ("title", "ylabel")):
            out.append("a figure without a title or y label")
    return out


def _check_records(result: dict[str, Any]) -> list[str]:
    checks = []
    for record in result["checks"]:
        try:
            check = Check.from_json(record)
            if not isinstance(check.quantity, str) or check.rule not in RULES:
                raise TypeError
            checks.append(check)
        except (TypeError, ValueError, KeyError, AttributeError):
            return ["a malformed check"]
        if record.get("outcome") != check.outcome:
            return [
                f"check {check.quantity!r} records an outcome its numbers do not give"
            ]
    if result["verdict"] == NOT_APPLICABLE:
        return [] if isinstance(result.get("reason"), str) else ["no reason given"]
    if result["verdict"] != combine(checks):
        return ["the verdict does not follow from the checks"]
    if result["criterion"] != criterion(checks):
        return ["the criterion text is not the checks' text"]
    return []


def _scalar_records(rows: Any, where: str, strings: tuple[str, ...]) -> list[str]:
    if not isinstance(rows, list):
        return [f"{where} is not a list"]
    for row in rows:
        if not isinstance(row, dict) or not all(
            isinstance(v, SCALAR) for v in row.values()
        ):
            return [f"{where} holds a value that is not a number or text"]
        if not all(isinstance(row.get(k), str) for k in strings):
            return [f"{where} has an entry without {' and '.join(strings)}"]
    return []


def _is_number(v: Any) -> bool:
    return (isinstance(v, numbers.Real) and not isinstance(v, bool)) or v in (
        "inf",
        "-inf",
    )


def _name(kind: type | tuple[type, ...]) -> str:
    return {str: "text", list: "a list", dict: "an object"}.get(kind, str(kind))
