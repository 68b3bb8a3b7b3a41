"""The repository stands on its own: a clone alone installs, tests and deploys."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT

# How code reaches outside the repository for files: `../shared`, `ROOT.parent / "shared"`, ...
OUTSIDE = re.compile(r"\.\./shared|parents?(\[\d\])?\s*/\s*[\"']shared[\"']")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if p.endswith((".py", ".yml", ".yaml", ".toml", ".cfg", ".sh"))
            or p in ("Makefile", ".ci/run")]


def test_nothing_reads_files_from_outside_the_repository():
    """CI and users clone the repository alone: what tests and scripts read must be inside it."""
    files = tracked_files()
    assert "Makefile" in files and "tests/bundle.py" in files
    offenders = [p for p in files if p != "tests/test_repository.py" and OUTSIDE.search((ROOT / p).read_text())]
    assert offenders == []
