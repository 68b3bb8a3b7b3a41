"""Transforms named in test configs as `tests.transforms:<name>`; imported on the executors."""

from __future__ import annotations

from typing import Any


def add_marker(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "marker": "from-transform"}


def shout(answer: Any) -> str:
    return str(answer).upper()


def explode(body: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("this transform always fails")


NOT_CALLABLE = "a module attribute that is not a function"
