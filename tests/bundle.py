"""The Databricks Asset Bundle as the CLI would see it, for tests: files, variables, task arguments.

The CLI itself (Go) is not installable here, so this does the few things its `validate` does that our
tests lean on: read `databricks.yml` and its `include`d files, take a target's variable values, fill
in `${...}` references, and build the argument list Databricks hands a python_wheel_task.

Example::

    b = load_bundle()
    job = resolved(b, "dev")["resources"]["jobs"]["batch_inference"]
    argv = task_argv(job, job["tasks"][0])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Vendored from the Databricks CLI (tests/assets/databricks-bundle-schema/README.md says which commit).
SCHEMA = ROOT / "tests" / "assets" / "databricks-bundle-schema" / "jsonschema.json"
# The serverless job is an alternative to the included one (same job key): it is checked on its own.
SERVERLESS = ["resources/serverless/*.yml"]

_REF = re.compile(r"\$\{([A-Za-z0-9_.\[\]-]+)\}")
_JOB_PARAM_REF = re.compile(r"\{\{\s*job\.parameters\.([A-Za-z0-9_.-]+)\s*\}\}")


def read_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def bundle_files(root: Path = ROOT, include: list[str] | None = None) -> dict[Path, dict[str, Any]]:
    """`databricks.yml` and the files its `include` globs (or `include`, if given) match, parsed."""
    main = read_yaml(root / "databricks.yml")
    files = {root / "databricks.yml": main}
    for pattern in include if include is not None else main.get("include", []):
        matched = sorted(root.glob(pattern))
        assert matched, f"include {pattern!r} matches no file"
        files.update({p: read_yaml(p) for p in matched})
    return files


def _merge(base: dict[str, Any], extra: dict[str, Any], where: str = "") -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{where}{key}.")
        else:
            assert key not in out, f"{where}{key} is defined twice"
            out[key] = value
    return out


def load_bundle(root: Path = ROOT, include: list[str] | None = None) -> dict[str, Any]:
    """The bundle's files merged into one document, as the CLI merges `include`d resources."""
    merged: dict[str, Any] = {}
    for doc in bundle_files(root, include).values():
        merged = _merge(merged, doc)
    return merged


def variable_values(bundle: dict[str, Any], target: str) -> dict[str, Any]:
    """Each declared variable's value in `target`: the target's value, else the default (or absent)."""
    values = {name: spec["default"] for name, spec in bundle.get("variables", {}).items()
              if isinstance(spec, dict) and "default" in spec}
    for name, value in (bundle["targets"][target].get("variables") or {}).items():
        values[name] = value["default"] if isinstance(value, dict) and "default" in value else value
    return values


def builtins(bundle: dict[str, Any], target: str, root: Path = ROOT) -> dict[str, str]:
    """Stand-ins for what the CLI knows at deploy time. The synced files root is this checkout."""
    return {
        "bundle.name": bundle["bundle"]["name"],
        "bundle.target": target,
        "workspace.file_path": str(root),
        "workspace.current_user.short_name": "dev_user",
        "workspace.current_user.userName": "dev.user@example.com",
    }


def interpolate(node: Any, values: dict[str, Any]) -> Any:
    """Fill in `${...}` references (repeatedly: a variable's value may hold one); unknown ones stay."""
    if isinstance(node, dict):
        return {k: interpolate(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, values) for v in node]
    if not isinstance(node, str):
        return node
    for _ in range(5):
        whole = _REF.fullmatch(node)
        if whole and whole.group(1) in values and not isinstance(values[whole.group(1)], str):
            return values[whole.group(1)]  # a whole-string reference keeps its value's type
        new = _REF.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), node)
        if new == node:
            break
        node = new
    return node


def resolved(bundle: dict[str, Any], target: str, root: Path = ROOT) -> dict[str, Any]:
    values = {f"var.{k}": v for k, v in variable_values(bundle, target).items()}
    return interpolate(bundle, {**values, **builtins(bundle, target, root)})


def references(node: Any, prefix: str = "var.") -> set[str]:
    """Every `${prefix...}` name used anywhere under `node`."""
    if isinstance(node, dict):
        return set().union(*(references(v, prefix) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(references(v, prefix) for v in node)) if node else set()
    if isinstance(node, str):
        return {m.group(1)[len(prefix):] for m in _REF.finditer(node) if m.group(1).startswith(prefix)}
    return set()


def jobs(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return bundle.get("resources", {}).get("jobs", {})


def task_argv(job: dict[str, Any], task: dict[str, Any],
              job_params: dict[str, str] | None = None) -> list[str]:
    """The argument list Databricks hands the wheel's entry point for `task` of `job`.

    `named_parameters` become `--key=value`, followed by the job's parameters pushed down the same
    way; a `parameters` list is passed as is, with `{{job.parameters.x}}` filled in (no push-down).
    """
    wheel = task["python_wheel_task"]
    params = {p["name"]: str(p["default"]) for p in job.get("parameters", [])}
    params.update(job_params or {})
    if "named_parameters" in wheel:
        named = {k: str(v) for k, v in wheel["named_parameters"].items()}
        return [f"--{k}={v}" for k, v in named.items()] + [f"--{k}={v}" for k, v in params.items()
                                                            if k not in named]
    return [_JOB_PARAM_REF.sub(lambda m: params[m.group(1)], str(a)) for a in wheel.get("parameters", [])]
