"""Credentials that never print: `Secret`, the bearer header, and scrubbing a secret out of any text."""

from __future__ import annotations

import pickle

import pytest

from udfs.auth import Secret, bearer, scrub

# Not hex, so no run id or hash can contain a piece of it by chance.
TOKEN = "dapi-TEST-Zq7w-SECRET-kx9R-v4lue-0042"


def test_a_secret_prints_as_stars_everywhere_but_reveal():
    s = Secret(TOKEN)
    assert repr(s) == str(s) == f"{s}" == f"{s:>30}" == "Secret('****')"
    assert s.reveal() == TOKEN
    assert pickle.loads(pickle.dumps(s)) == s  # it travels to the executors intact
    with pytest.raises(ValueError, match="non-empty"):
        Secret("")


def test_bearer_builds_the_header_as_a_secret():
    assert bearer(Secret(TOKEN)) == {"Authorization": Secret(f"Bearer {TOKEN}")}
    assert bearer(None) == {}


def test_scrub_removes_the_header_value_and_the_bare_credential():
    header = Secret(f"Bearer {TOKEN}")
    text = f"got 'Bearer {TOKEN}' and then just {TOKEN}, twice: {TOKEN}"
    assert scrub(text, [header, None]) == "got '****' and then just ****, twice: ****"
    assert scrub("nothing here", [header]) == "nothing here"


@pytest.mark.parametrize("part", ["prefix", "suffix", "middle"])
def test_scrub_removes_any_run_of_eight_characters_of_the_token(part):
    """An endpoint that quotes only part of a token (`dapi` and 11 more characters) still leaks it."""
    run = {"prefix": TOKEN[:15], "suffix": TOKEN[-9:], "middle": TOKEN[12:20]}[part]
    assert len(run) >= 8
    text = f"token {run} rejected"
    assert scrub(text, [Secret(f"Bearer {TOKEN}")]) == "token **** rejected"
    assert scrub(text, [Secret(TOKEN)]) == "token **** rejected"
    # Seven characters are not a secret's worth: ordinary words must survive.
    assert scrub(f"token {TOKEN[:7]} rejected", [Secret(TOKEN)]) == f"token {TOKEN[:7]} rejected"
