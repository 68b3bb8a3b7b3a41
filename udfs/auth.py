"""Credentials that never print.

`Secret` wraps a string so that `repr`, `str`, f-strings, logging and exception messages show
`'****'`; only `reveal()` gives the value, at the moment a header is built. `scrub` removes a
secret's value from any text (an endpoint that echoes headers back in an error message).

Example::

    token = Secret(os.environ["DATABRICKS_TOKEN"])
    headers = bearer(token)          # {"Authorization": Secret('****')} until sent
"""

from __future__ import annotations

from typing import Iterable


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError("a secret must be a non-empty string")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> tuple:
        # Pickled into the UDF's closure for the executors; the bytes never reach a log or the plan.
        return (Secret, (self._value,))


def scrub(text: str, secrets: Iterable[Secret | None]) -> str:
    """`text` without any secret's value, nor the bare credential of a `Bearer <token>` header value.

    Endpoints that quote a rejected token usually quote the token alone, not the header line.
    """
    for s in secrets:
        if s is None:
            continue
        value = s.reveal()
        scheme, _, credential = value.partition(" ")
        for form in (value, credential.strip() if scheme.isalpha() else ""):
            if len(form) >= 4:
                text = text.replace(form, "****")
    return text


def bearer(token: Secret | None) -> dict[str, Secret]:
    return {"Authorization": Secret(f"Bearer {token.reveal()}")} if token else {}
