"""The repository stands on its own: a clone alone installs, tests and deploys."""

from __future__ import annotations

import ast
import re
import subprocess

from tests.conftest import ROOT
from udfs import reasons

# How code reaches for the sibling folder of shared files a developer's machine has beside the
# clone (a relative path up and into it, or the root's parent joined with its name); CI has no such folder.
SIBLING = "sha" + "red"  # spelt in two parts so that this file does not match itself
OUTSIDE = re.compile(rf"\.\./{SIBLING}|parents?(\[\d\])?\s*/\s*[\"']{SIBLING}[\"']")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if (ROOT / p).is_file() and (
        p.endswith((".py", ".yml", ".yaml", ".toml", ".cfg", ".sh")) or p in ("Makefile", ".ci/run"))]


def test_nothing_reads_files_from_outside_the_repository():
    """CI and users clone the repository alone: what tests and scripts read must be inside it."""
    files = tracked_files()
    assert "Makefile" in files and "tests/bundle.py" in files
    offenders = [p for p in files if OUTSIDE.search((ROOT / p).read_text())]
    assert offenders == []


# -- the shape of the code ---------------------------------------------------------------------------

def _module_name(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """The import graph among our own modules (every import: inside functions and under TYPE_CHECKING
    too, since a cycle hidden by a lazy import is still a cycle in the design), and the private names
    imported across modules."""
    files = [p for pkg in ("jobs", "udfs") for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [(node.module, a.name) for a in node.names]
            else:
                continue
            for module, imported in targets:
                hit = next((k for k in (f"{module}.{imported}" if imported else None, module) if k in modules), None)
                if hit and hit != name and hit != name.rsplit(".", 1)[0]:
                    graph[name].add(hit)
                if imported and imported.startswith("_") and not imported.startswith("__") and module in modules:
                    private.append(f"{name} imports {module}.{imported}")
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return found


def test_no_import_cycles_and_no_private_names_across_modules():
    graph, private = _imports()
    assert "jobs.pipeline" in graph and graph["jobs.pipeline"], "the graph was read"
    assert _cycles(graph) == []
    assert private == []


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_only_the_udf_module_of_udfs_imports_spark():
    """udfs/ is the engine beneath the pandas UDF: pure Python but for the one wrapper."""
    spark_users = [_module_name(p) for p in (ROOT / "udfs").rglob("*.py")
                   if re.search(r"^\s*(from|import) pyspark", p.read_text(), re.M)]
    assert spark_users == ["udfs.inference"]


def test_the_readme_layout_names_every_package_and_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    lines = layout.splitlines()
    for pkg in ("jobs", "udfs"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT / pkg)
            if rel.name == "__init__.py":
                if rel.parent.name:
                    assert f"  {rel.parent.name}/" in layout, f"README Layout lacks the folder {pkg}/{rel.parent}"
                continue
            # A module is listed as `name.py`, or by name on its sub-folder's line (`observe/  progress, ...`).
            folder_line = next((line for line in lines if line.startswith(f"  {rel.parent.name}/")), "")
            listed = f"{rel.stem}.py" in layout or (rel.parent.name and re.search(rf"\b{rel.stem}\b", folder_line))
            assert listed, f"README Layout lacks {pkg}/{rel}"


def test_the_readme_lists_every_reason_code_and_no_other():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("The reason codes of the `error` column"):]
    section = section[:section.index("```")]
    listed = re.findall(r"^\| `([a-z_<>]+)` \|", section, re.M)
    assert listed == list(reasons.MEANING)
