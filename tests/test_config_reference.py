"""docs/config.md is the reference of every config key: generated from jobs/config.py, and current."""

from __future__ import annotations

import runpy

import pytest

from tests.conftest import ROOT

GENERATOR = ROOT / "docs" / "config_reference.py"


def generator() -> dict:
    return runpy.run_path(str(GENERATOR))  # not as __main__: nothing is written


def test_the_config_reference_is_current():
    written = (ROOT / "docs" / "config.md").read_text()
    assert written == generator()["reference"](), (
        "docs/config.md is out of date: run `.venv/bin/python docs/config_reference.py`")


def test_every_key_of_every_section_is_in_the_reference():
    from jobs.config import JobConfig

    text = (ROOT / "docs" / "config.md").read_text()
    for section, field in JobConfig.model_fields.items():
        assert f"| `{section}` |" in text, section  # the top level lists every section and key
        for key in getattr(field.annotation, "model_fields", {}):
            assert f"| `{section}.{key}` |" in text, f"{section}.{key}"


def test_a_field_without_a_comment_is_refused(monkeypatch):
    g = generator()
    monkeypatch.setitem(g["reference"].__globals__, "comments", lambda model: {})
    with pytest.raises(ValueError, match=r"no comment above these fields in jobs/config.py: input, output, .*input.table, "):
        g["reference"]()
