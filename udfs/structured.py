"""Structured output: a JSON Schema the answers must match, what it sends, and how an answer is checked.

Pure code (no Spark, no HTTP). `compile_schema` reads a JSON Schema into a `Node` tree, the shape the
job can land as a typed column (`jobs.output.structured` maps it to a Spark type); it refuses, naming the
schema location, what has no single column type (`oneOf`, a union of types, an untyped property).
`AnswerChecker` checks one answer: JSON, then the schema (the `jsonschema` package; the most relevant
error and its path are reported), then a canonical JSON of it whose numbers fit the column types
exactly, for Spark's `from_json` to read. A failure is `InvalidOutput`, its message `<path>: <what>`.

Example::

    checker = AnswerChecker({"type": "object", "properties": {"n": {"type": "integer"}}})
    checker.check('{"n": 3.0}')          # '{"n":3}'
    checker.check('{"n": "three"}')      # InvalidOutput: $.n: 'three' is not of type 'integer'
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match
from jsonschema.validators import validator_for

# Delta refuses these characters in column names, nested fields included (without column mapping).
DELTA_FORBIDDEN = " ,;{}()\n\t="
# Spark's bigint: a JSON integer beyond it would land as null, so it is an invalid answer instead.
LONG_MIN, LONG_MAX = -(2 ** 63), 2 ** 63 - 1
# Keywords that make a value one of several shapes: no single column type holds it.
_UNIONS = ("oneOf", "not", "if", "then", "else", "patternProperties", "prefixItems", "dependentSchemas")
_SCALARS = {"string": "string", "integer": "long", "number": "double", "boolean": "boolean"}
_MESSAGE_CHARS = 200


class UnsupportedSchema(ValueError):
    """The schema cannot be landed as a typed column; the message names where (`/properties/x`)."""


class InvalidOutput(ValueError):
    """An answer that is not JSON or does not match the schema; the message names the first failing path."""


@dataclass(frozen=True)
class Node:
    """One level of the landed shape: a scalar (`string`, `long`, `double`, `boolean`), a `struct` of
    named fields, an `array` of `item`, or a `map` from string keys to `item`."""

    kind: str
    fields: tuple[tuple[str, Node], ...] = ()
    item: Node | None = None
    required: tuple[str, ...] = ()


def wire_format(schema: dict[str, Any], name: str = "response", strict: bool = True) -> dict[str, Any]:
    """The `response_format` Databricks foundation and external model endpoints take (OpenAI's form)."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


def validator_class(schema: dict[str, Any]) -> Any:
    """The validator of the schema's `$schema` draft (2020-12 when it names none)."""
    return validator_for(schema, default=Draft202012Validator)


def check_schema(schema: Any) -> Node:
    """A usable response schema's `Node`, or `UnsupportedSchema` naming what is wrong and where."""
    if not isinstance(schema, dict):
        raise UnsupportedSchema(f"expected a JSON Schema object, got {type(schema).__name__}")
    try:
        validator_class(schema).check_schema(schema)
    except SchemaError as exc:
        raise UnsupportedSchema(f"not a valid JSON Schema at {_pointer(exc.absolute_path)}: "
                                f"{_cut(exc.message)}") from None
    node = compile_schema(schema)
    if node.kind != "struct":
        raise UnsupportedSchema("the top level must be an object with properties (it lands as a struct)")
    return node


def compile_schema(schema: Any) -> Node:
    """The landed shape of `schema`; `UnsupportedSchema` for what has no single column type."""
    return _compile(schema, "", schema, ())


def _compile(s: Any, where: str, root: dict[str, Any], refs: tuple[str, ...]) -> Node:
    at = where or "/"
    if not isinstance(s, dict):
        raise UnsupportedSchema(f"at {at}: {s!r} is not a schema object (a boolean schema has no type)")
    if "$ref" in s:
        ref = s["$ref"]
        if ref in refs:
            raise UnsupportedSchema(f"at {at}: $ref {ref} is recursive; a column type cannot nest forever")
        return _compile(_resolve(ref, root, at), where, root, (*refs, ref))
    for key in _UNIONS:
        if key in s:
            raise UnsupportedSchema(f"at {at}: {key} is not supported: a column has one type "
                                    "(use type, enum, properties, items)")
    for key in ("anyOf", "allOf"):
        if key in s:
            return _compile(_one_branch(s, key, at), where, root, refs)
    kind = _type_of(s, at)
    if kind in _SCALARS:
        return Node(_SCALARS[kind])
    if kind == "array":
        items = s.get("items")
        if not isinstance(items, dict):
            raise UnsupportedSchema(f"at {at}: an array needs items with a schema (one type for every element)")
        return Node("array", item=_compile(items, f"{where}/items", root, refs))
    if kind == "object":
        props = s.get("properties")
        if props:
            if not isinstance(props, dict):
                raise UnsupportedSchema(f"at {at}/properties: expected a mapping of property schemas")
            _check_names(props, f"{where}/properties")
            fields = tuple((name, _compile(sub, f"{where}/properties/{_escape(name)}", root, refs))
                           for name, sub in props.items())
            return Node("struct", fields=fields, required=tuple(s.get("required") or ()))
        extra = s.get("additionalProperties")
        if isinstance(extra, dict):  # string keys to one value type: a map column
            return Node("map", item=_compile(extra, f"{where}/additionalProperties", root, refs))
        raise UnsupportedSchema(f"at {at}: an object needs properties (a struct), or additionalProperties "
                                "with a schema (a map)")
    raise UnsupportedSchema(f"at {at}: type {kind!r} alone has no column type")


def _type_of(s: dict[str, Any], at: str) -> str:
    t = s.get("type")
    if isinstance(t, list):
        kinds = [k for k in t if k != "null"]  # every landed field is nullable anyway
        if len(kinds) != 1:
            raise UnsupportedSchema(f"at {at}: type {t} is a union; a column has one type")
        return str(kinds[0])
    if isinstance(t, str):
        return t
    values = s["enum"] if isinstance(s.get("enum"), list) else [s["const"]] if "const" in s else None
    if values is not None:
        return _enum_type([v for v in values if v is not None], at)
    if "properties" in s or "additionalProperties" in s:
        return "object"
    if "items" in s:
        return "array"
    raise UnsupportedSchema(f"at {at}: no type; an untyped value cannot be a column (give it a type)")


def _enum_type(values: list[Any], at: str) -> str:
    kinds = {"boolean" if isinstance(v, bool) else "integer" if isinstance(v, int)
             else "number" if isinstance(v, float) else "string" if isinstance(v, str) else "other"
             for v in values}
    if kinds == {"integer", "number"}:
        return "number"
    if len(kinds) != 1 or "other" in kinds:
        raise UnsupportedSchema(f"at {at}: enum values of several types ({sorted(kinds)}); give a type")
    return kinds.pop()


def _one_branch(s: dict[str, Any], key: str, at: str) -> dict[str, Any]:
    """`anyOf: [X, {type: null}]` (how Pydantic writes `Optional[X]`) or a one-branch `allOf`/`anyOf`:
    the branch X, with the siblings (description, default) dropped."""
    branches = s[key] if isinstance(s[key], list) else []
    real = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
    if len(real) != 1 or (key == "allOf" and len(branches) != 1):
        raise UnsupportedSchema(f"at {at}: {key} with several branches is not supported: a column has one "
                                "type (only anyOf [X, {type: null}], an optional X, is)")
    return real[0]


def _resolve(ref: Any, root: dict[str, Any], at: str) -> Any:
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise UnsupportedSchema(f"at {at}: $ref {ref!r}: only references inside the schema (#/$defs/...) "
                                "are supported")
    node: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise UnsupportedSchema(f"at {at}: $ref {ref} points to nothing")
        node = node[part]
    return node


def _check_names(props: dict[str, Any], at: str) -> None:
    seen: dict[str, str] = {}
    for name in props:
        bad = sorted({c for c in name if c in DELTA_FORBIDDEN})
        if not name or bad:
            shown = "an empty name" if not name else f"{name!r} has {', '.join(repr(c) for c in bad)}"
            raise UnsupportedSchema(f"at {at}: property {shown}; Delta column names cannot hold "
                                    f"{DELTA_FORBIDDEN!r}")
        if name.lower() in seen:
            raise UnsupportedSchema(f"at {at}: properties {seen[name.lower()]!r} and {name!r} differ only in "
                                    "case; Spark SQL could not tell the fields apart")
        seen[name.lower()] = name


class AnswerChecker:
    """Checks answers against one schema; built once per task (the validator compiles the schema)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.node = check_schema(schema)
        self._validator = validator_class(schema)(schema)

    def check(self, text: str | None) -> str:
        """The answer as canonical JSON (what `from_json` lands), or `InvalidOutput` saying why not."""
        if text is None:
            raise InvalidOutput("no text in the answer")
        try:
            value = json.loads(text, parse_constant=_no_constant)
        except ValueError as exc:
            raise InvalidOutput(f"not JSON: {_json_problem(exc)}") from None
        error = best_match(self._validator.iter_errors(value))
        if error is not None:
            raise InvalidOutput(f"{_jsonpath(error.absolute_path)}: {_cut(error.message)}")
        return json.dumps(_canonical(value, self.node, "$"), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False)


def _canonical(value: Any, node: Node, path: str) -> Any:
    """`value` (valid against the schema) in the exact form of the column types: integers as JSON
    integers within bigint (JSON Schema takes 3.0 as an integer; `from_json` would land null), finite
    doubles, and only the properties the struct has."""
    if value is None:
        return None
    kind = node.kind
    if kind == "long" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not value.is_integer():
            raise InvalidOutput(f"{path}: {value!r} is not an integer")
        if not LONG_MIN <= int(value) <= LONG_MAX:
            raise InvalidOutput(f"{path}: {value!r} is out of range for a bigint")
        return int(value)
    if kind == "double" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise InvalidOutput(f"{path}: {value!r} is out of range for a double")
        return float(value)
    if (kind == "string" and isinstance(value, str)) or (kind == "boolean" and isinstance(value, bool)):
        return value
    if kind == "struct" and isinstance(value, dict):
        return {name: _canonical(value[name], sub, f"{path}.{name}") for name, sub in node.fields if name in value}
    if kind == "map" and isinstance(value, dict) and node.item is not None:
        return {k: _canonical(v, node.item, f"{path}.{k}") for k, v in value.items()}
    if kind == "array" and isinstance(value, list) and node.item is not None:
        return [_canonical(v, node.item, f"{path}[{i}]") for i, v in enumerate(value)]
    # The validator accepted it, so the schema allows more than the column holds (a keyword we ignore).
    raise InvalidOutput(f"{path}: {_cut(repr(value))} does not fit the column type {kind}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _json_problem(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (line {exc.lineno}, column {exc.colno})"
    return str(exc)


def _jsonpath(parts: Iterable[Any]) -> str:
    """`$.items[0].name`: where in the answer (JSONPath, as analysts read it)."""
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _pointer(parts: Iterable[Any]) -> str:
    """`/properties/x`: where in the schema (JSON Pointer, as JSON Schema tools print it)."""
    return "".join(f"/{_escape(str(p))}" for p in parts) or "/"


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _cut(text: str) -> str:
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."
