"""Write docs/config.md, the reference of every config key, from the pydantic models in jobs/config.py.

Each key's type and default come from the model; its meaning is the comment above the field in
jobs/config.py (the place a developer changes it). `tests/test_config_reference.py` fails when the file
is not what this script writes, or when a field has no comment.

Usage::

    .venv/bin/python docs/config_reference.py          # rewrites docs/config.md
"""

from __future__ import annotations

import ast
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import config  # noqa: E402

OUT = ROOT / "docs" / "config.md"
HEAD = """# Configuration reference

Every key of a `--conf` YAML file, by section; set any of them on the command line with
`--set section.key=value` (or `--section.key=value`). Generated from the pydantic models in
`jobs/config.py` by `python docs/config_reference.py`; `make test` checks that it is current.
Required keys have no default. Keys are validated before Spark starts; an unknown key is an error that
suggests the nearest known one.
"""


def comments(model: type[BaseModel]) -> dict[str, str]:
    """The comment lines right above each field of `model`, joined into one line."""
    source = inspect.getsource(model)
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                above.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            out[node.target.id] = " ".join(above)
    return out


def type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(named) + (" or null" if type(None) in args else "")
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "see below"
    text = str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)
    return f"`{text}`"


SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("", config.JobConfig),  # the top level: its sections, and the keys that are not sections
    ("input", config.InputConfig), ("output", config.OutputConfig), ("endpoint", config.EndpointConfig),
    ("endpoint.token_secret", config.SecretRef), ("endpoint.response_format", config.ResponseFormatConfig),
    ("endpoints[]", config.RoutedEndpoint),
    ("limits", config.LimitsConfig), ("retry", config.RetryConfig), ("run", config.RunConfig),
    ("run.budget", config.BudgetConfig), ("mlflow", config.MlflowConfig),
]


def reference() -> str:
    """The whole of docs/config.md; a `ValueError` names a field without a comment."""
    missing, parts = [], [HEAD]
    for section, model in SECTIONS:
        meaning = comments(model)
        base = next((b for b in model.__bases__ if issubclass(b, BaseModel) and b.model_fields), None)
        also = f"\nEvery key of `{dict((m, k) for k, m in SECTIONS)[base]}`, and:\n" if base else ""
        title = f"`{section}`" if section else "The top level"
        parts.append(f"\n## {title}\n{also}\n| key | type | default | meaning |\n|---|---|---|---|")
        own = model.__annotations__  # a subclass's own fields (`endpoints[]` adds role, limits to endpoint's)
        for name, field in model.model_fields.items():
            if name not in own:
                continue
            key = f"{section}.{field.alias or name}" if section else field.alias or name
            if not meaning.get(name):
                missing.append(key)
            text = meaning.get(name, "").replace("|", "\\|")
            parts.append(f"| `{key}` | {type_name(field.annotation)} | {default_text(field)} | {text} |")
    if missing:
        raise ValueError(f"no comment above these fields in jobs/config.py: {', '.join(missing)}")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    OUT.write_text(reference())
    print(f"wrote {OUT.relative_to(ROOT)}")
