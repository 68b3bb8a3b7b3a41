"""Credentials that never print.

`Secret` wraps a string so that `repr`, `str`, f-strings, logging and exception messages show
`'****'`; only `reveal()` gives the value, at the moment a header is built. `scrub` removes any
run of 8 or more characters of a secret from a text (an endpoint that echoes a token, or part of
one, back in an error message).

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


# A run of this many characters of a secret is scrubbed wherever it appears: an endpoint that echoes
# a prefix, a suffix or a middle of a token leaks it just as well as one that echoes it whole.
SCRUB_MIN_RUN = 8


def scrub(text: str, secrets: Iterable[Secret | None]) -> str:
    """`text` with every run of `SCRUB_MIN_RUN` or more characters of any secret replaced by `****`.

    A run is found through the secret's substrings of that length: every position of `text` that
    starts one is covered, and each maximal covered stretch becomes one `****`. Shorter runs stay
    (7 characters of a 40-character token cannot be replayed; refusing them would eat ordinary words).
    """
    grams: set[str] = set()
    for s in secrets:
        if s is not None:
            if len(s.reveal()) >= SCRUB_MIN_RUN:  # a whole header value (`Bearer <token>`) goes as one
                text = text.replace(s.reveal(), "****")
            value = _credential(s.reveal())
            grams.update(value[i:i + SCRUB_MIN_RUN] for i in range(len(value) - SCRUB_MIN_RUN + 1))
    if not grams or len(text) < SCRUB_MIN_RUN:
        return text
    covered_to, spans = -1, []  # [start, end) of covered stretches, in order
    for i in range(len(text) - SCRUB_MIN_RUN + 1):
        if text[i:i + SCRUB_MIN_RUN] in grams:
            end = i + SCRUB_MIN_RUN
            if spans and i <= covered_to:
                spans[-1][1] = end
            else:
                spans.append([i, end])
            covered_to = end
    if not spans:
        return text
    out, last = [], 0
    for start, end in spans:
        out += [text[last:start], "****"]
        last = end
    out.append(text[last:])
    return "".join(out)


def _credential(value: str) -> str:
    """The secret part of a header value: `Bearer <token>` -> `<token>`; anything else whole."""
    scheme, sep, credential = value.partition(" ")
    return credential.strip() if sep and scheme.isalpha() and credential.strip() else value


def bearer(token: Secret | None) -> dict[str, Secret]:
    return {"Authorization": Secret(f"Bearer {token.reveal()}")} if token else {}
