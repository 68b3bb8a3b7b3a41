"""User transforms by `module:function`: found, or refused with the reference named."""

from __future__ import annotations

import pytest

from udfs.transforms import import_function


def test_a_function_is_imported_by_its_reference():
    assert import_function("tests.transforms:shout")("quiet") == "QUIET"


@pytest.mark.parametrize("ref, message", [
    ("tests.transforms:no_such", r"cannot import 'tests.transforms:no_such'"),
    ("no_such_module:f", r"cannot import 'no_such_module:f'"),
    ("tests.transforms:NOT_CALLABLE", r"'tests.transforms:NOT_CALLABLE' is not callable"),
])
def test_a_bad_reference_is_named(ref, message):
    with pytest.raises(ImportError, match=message):
        import_function(ref)
