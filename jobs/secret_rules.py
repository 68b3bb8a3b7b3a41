"""What counts as a secret in a file we read or print: one rule for job configs and endpoint specs.

Secrets never live in `conf/`: a job config names where a token is (`endpoint.token_env`,
`endpoint.token_secret`), and an endpoint spec references a secret scope
(`"{{secrets/<scope>/<key>}}"`). `find_secrets` walks a parsed YAML document and reports, by path and
never by value, what breaks that rule:

- a credential-named key (`token`, `api_key`, `password`, `..._secret`, `private_key`,
  `access_key_id`, the `value` of a `*_auth` block) holding a literal instead of a reference;
- a `*_plaintext` field (Databricks' spelling of "the key itself");
- a token-shaped value under any key (`dapi...`, `dkea...`, `sk-...`, a `Bearer ...` header);
- a URL that carries a password (`https://user:pw@host`) or a credential-named query parameter.

`redact_url` is the printing side of the same rule: a URL as it may be shown in logs and reports.

Example::

    [f.path for f in find_secrets({"endpoint": {"token": "abc"}})]   # ['endpoint.token']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

# Keys whose literal value would be a credential (matched on the last dotted part of the key).
CREDENTIAL_KEY = re.compile(
    r"(^|_)(token|api_?key|password|passwd|secret|authorization|bearer|private_key|access_key(_id)?)$", re.I)
# Keys that say *where* a secret is, never the secret itself.
REFERENCE_KEYS = frozenset({"token_env", "token_secret"})
# Values that look like credentials whatever their key: Databricks PATs, OpenAI-style keys, anywhere in
# a value (`https://token:dapi...@host`); a bearer header at the start.
TOKEN_VALUE = re.compile(r"\b(dapi[0-9a-f]{16,}|dkea[0-9a-f]{16,}|sk-[A-Za-z0-9_-]{16,})|^Bearer\s+\S{8,}", re.I)
# `{{secrets/scope/key}}`: how Databricks references a secret without revealing it.
SECRET_REFERENCE = re.compile(r"^\{\{secrets/[^/}]+/[^/}]+\}\}$")

LITERAL_CREDENTIAL = "literal_credential"
PLAINTEXT_FIELD = "plaintext_field"
TOKEN_SHAPED = "token_value"
URL_CREDENTIAL = "url_credential"


@dataclass(frozen=True)
class Finding:
    """Where a secret was found and what kind of finding it is; never the value."""

    path: str
    kind: str
    detail: str = ""


def find_secrets(node: Any, path: str = "", *,
                 is_reference: Callable[[str], bool] = lambda value: False) -> Iterator[Finding]:
    """Every place in `node` that holds a secret. `is_reference` accepts more reference forms than
    `{{secrets/...}}` (the bundle's `${var...}`, which the CLI fills in later)."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            name = str(key).rsplit(".", 1)[-1]
            if name.endswith("_plaintext") and value not in (None, ""):
                yield Finding(where, PLAINTEXT_FIELD, name[: -len("_plaintext")])
            elif _credential_key(name, path) and not _referenced(value, is_reference):
                yield Finding(where, LITERAL_CREDENTIAL)
                continue
            yield from find_secrets(value, where, is_reference=is_reference)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from find_secrets(value, f"{path}[{i}]", is_reference=is_reference)
    elif isinstance(node, str) and TOKEN_VALUE.search(node.strip()):
        yield Finding(path, TOKEN_SHAPED)
    elif isinstance(node, str) and (what := url_credential(node)):
        yield Finding(path, URL_CREDENTIAL, what)


def _credential_key(name: str, parent: str) -> bool:
    # A custom provider's `api_key_auth: {key: ..., value: ...}` keeps the credential under `value`.
    return (bool(CREDENTIAL_KEY.search(name)) and name not in REFERENCE_KEYS) or (
        name == "value" and parent.endswith("_auth"))


def _referenced(value: Any, is_reference: Callable[[str], bool]) -> bool:
    if value in (None, ""):
        return True
    return isinstance(value, str) and bool(SECRET_REFERENCE.match(value) or is_reference(value))


def url_credential(value: str) -> str | None:
    """What makes a URL a credential: a password (`https://user:pw@host`) or a query key like `api_key`."""
    if not re.match(r"https?://", value.strip(), re.I):
        return None
    try:
        parts = urlsplit(value.strip())
        password = parts.password
    except ValueError:
        return None
    if password:
        return "a password"
    for key, _, val in (q.partition("=") for q in parts.query.split("&")):
        if val and CREDENTIAL_KEY.search(unquote(key)) and not SECRET_REFERENCE.match(unquote(val)):
            return f"query parameter {unquote(key)}"
    return None


def redact_url(value: str) -> str:
    """A URL as it may be printed: its password and every query value masked (a query can carry a
    credential no key name betrays). Anything that is not an http(s) URL comes back unchanged."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.scheme not in ("http", "https") or not (parts.password or parts.query):
        return value
    netloc = parts.netloc if not parts.password else parts.netloc.replace(f":{parts.password}@", ":****@")
    pairs = (q.partition("=") for q in parts.query.split("&"))
    query = "&".join(f"{k}=****" if sep else k for k, sep, _ in pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(node: Any) -> Any:
    """`redact_url` applied to every string of a parsed document."""
    if isinstance(node, dict):
        return {k: redact(v) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    return redact_url(node) if isinstance(node, str) else node
