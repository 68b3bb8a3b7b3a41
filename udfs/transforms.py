"""The user's transform functions, named in config as `module:function` and imported on the executors.

Example::

    fn = import_function("tests.transforms:shout")
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def import_function(ref: str) -> Callable[..., Any]:
    """`"package.module:function"` -> the function, with an error that names the reference."""
    module_name, _, attr = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"cannot import {ref!r}: {exc}") from None
    if not callable(fn):
        raise ImportError(f"{ref!r} is not callable")
    return fn
