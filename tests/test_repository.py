"""The repository stands on its own: a clone alone installs, tests and deploys."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT

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
