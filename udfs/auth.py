"""Credentials that never print, and tokens that stay fresh.

`Secret` wraps a string so that `repr`, `str`, f-strings, logging and exception messages show
`'****'`; only `reveal()` gives the value, at the moment a header is built. `scrub` removes any
run of 8 or more characters of a secret from a text (an endpoint that echoes a token, or part of
one, back in an error message).

`Credentials` are an `Authorization` header that can change during a run (OAuth tokens live an
hour). `OAuthM2M` mints a service principal's token with databricks-sdk's own client-credentials
flow (`databricks.sdk.oauth.ClientCredentials`) wherever it runs, driver or executor, and again
before the token expires; `Snapshot` is a header taken on the driver, as it was, for one chunk's
tasks, and `DriverRelay` one that asks the driver for its current header when it lapses (the job's
own token, which only the driver can refresh). `DataPlaneToken` exchanges a workspace OAuth token for
one scoped to a route-optimized endpoint. Every token is a `Secret`.

Example::

    token = Secret(os.environ["DATABRICKS_TOKEN"])
    headers = bearer(token)          # {"Authorization": Secret('****')} until sent
    creds = OAuthM2M(token_url, "sp-app-id", Secret(client_secret)); creds.refresh()
    creds.header()                   # Secret('****'): "Bearer <a token minted a moment ago>"
"""

from __future__ import annotations

import time
from typing import Any, Iterable


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


# -- credentials that change during a run ---------------------------------------------------------

class CredentialError(Exception):
    """No token could be had: the message says why, with no secret in it."""


# When a token is due. A header whose expiry this process is told (databricks-sdk's on the driver, or the
# driver's as the relay hands it on) is refreshed this long before it: a request sent then still has
# a minute to be read, and the SDK's own refresh is not raced to the last second.
KNOWN_EXPIRY_MARGIN_S = 60.0
# A token this process mints is refreshed a share of its life before it expires, at most
# `MINTED_MARGIN_MAX_S` (a one-hour token at 55 minutes): a short-lived token keeps a margin in
# proportion, a long-lived one is not thrown away a quarter of an hour early.
MINTED_MARGIN_SHARE = 0.25
MINTED_MARGIN_MAX_S = 300.0
# The life of a minted token whose endpoint names no expiry: Databricks' OAuth tokens live an hour.
MINTED_DEFAULT_LIFE_S = 3600.0
# Tokens held before the current one that are still scrubbed from what endpoints echo (a request sent
# with one may be answered after the refresh).
OLD_TOKENS_SCRUBBED = 4
# A `CredentialError` quotes the token endpoint's answer up to this many characters.
_ERROR_CHARS = 300


def minted_margin(life_s: float) -> float:
    """How long before its expiry a token of `life_s` seconds that this process minted is refreshed."""
    return min(MINTED_MARGIN_MAX_S, life_s * MINTED_MARGIN_SHARE)


class Credentials:
    """An `Authorization` header that may change during a run.

    `header()` is the current value (no I/O); `due(now)` says it should be refreshed before the next
    request (`now` is wall-clock time: a token minted on the driver is checked on an executor);
    `refresh()` gets a new one (blocking I/O, raises `CredentialError`); `generation` counts the
    refreshes, so that many requests refused with one token refresh it once. `refreshable` says
    whether `refresh()` can give anything new in this process: a refused request is then retried
    once with a new token. `for_tasks()` is what ships to the executors. `secrets()` is every value
    to scrub from what an endpoint echoes: the header, the last few it replaced, and whatever a
    subclass holds to get a new one.
    """

    refreshable = False
    generation = 0
    expires_at: float | None = None
    _header: Secret | None = None
    _old: tuple[Secret, ...] = ()

    def header(self) -> Secret | None:
        return self._header

    def due(self, now: float) -> bool:
        return False

    def refresh(self) -> None:
        pass

    def secrets(self) -> list[Secret]:
        return [s for s in (self._header, *self._old) if s is not None]

    def for_tasks(self) -> Credentials:
        return self

    def _hold(self, new: Secret | None) -> None:
        """`new` is the header from now on, one generation on; the one it replaces is still scrubbed."""
        if self._header is not None:
            self._old = (self._header, *self._old)[:OLD_TOKENS_SCRUBBED]
        self._header = new
        self.generation += 1


class Snapshot(Credentials):
    """A header as the driver had it when a chunk started: not refreshable where it is shipped."""

    def __init__(self, header: Secret | None, expires_at: float | None = None, source: str = "") -> None:
        self._header, self.expires_at, self.source = header, expires_at, source

    def __repr__(self) -> str:
        return f"Snapshot(source={self.source!r}, expires_at={self.expires_at!r})"


class _KnownExpiry(Credentials):
    """A header refreshed by asking someone who knows it (databricks-sdk, the driver's relay), with the
    expiry they tell, if any: due `KNOWN_EXPIRY_MARGIN_S` before it, never when none is told."""

    refreshable = True

    def due(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at - KNOWN_EXPIRY_MARGIN_S

    def _told(self, value: str | None, expires_at: float | None) -> None:
        """What was asked answered `value` until `expires_at`: a new generation only if it changed."""
        self.expires_at = expires_at
        new = Secret(value) if value else None
        if new != self._header:
            self._hold(new)


class _Minted(Credentials):
    """A token this object mints itself, wherever it is (driver or task): due a `minted_margin` of its
    life before it expires, or when it has none yet."""

    refreshable = True
    issued_at = 0.0
    expires_at = 0.0

    def due(self, now: float) -> bool:
        if self._header is None:
            return True
        return now >= self.expires_at - minted_margin(self.expires_at - self.issued_at)

    def _mint(self, source: Any, failure: str) -> None:
        """A new token from databricks-sdk's token `source`; `failure` opens the `CredentialError`."""
        issued = time.time()
        try:
            token = source.refresh()
        except Exception as exc:  # the SDK's message is the token endpoint's error code and summary
            detail = scrub(f"{type(exc).__name__}: {exc}", self.secrets())
            raise CredentialError(f"{failure}: {detail}"[:_ERROR_CHARS]) from None
        self.issued_at = issued
        self.expires_at = token.expiry.timestamp() if token.expiry else issued + MINTED_DEFAULT_LIFE_S
        self._hold(Secret(f"{token.token_type or 'Bearer'} {token.access_token}"))

    def _mint_if_due(self) -> None:
        """Mint here (the driver, before a chunk) if due, so that tasks do not each mint one at once."""
        if self.due(time.time()):
            try:
                self.refresh()
            except CredentialError:
                pass  # the tasks will try, and say so on the rows if they cannot

    def _holding(self, header: Secret | None, issued_at: float, expires_at: float) -> _Minted:
        """Itself holding a token minted elsewhere (a task gets the driver's): it mints none until due."""
        self._header, self.issued_at, self.expires_at = header, issued_at, expires_at
        return self


class OAuthM2M(_Minted):
    """A service principal's OAuth token (client credentials), minted with databricks-sdk wherever this
    object is: tasks refresh their own, so a run (or one chunk) may outlast any one token.

    A token is refreshed `minted_margin` before it expires: a quarter of its life, at most 5 minutes
    (a one-hour token at 55 minutes), so that no request goes out with a token about to lapse.
    """

    def __init__(self, token_url: str, client_id: str, client_secret: Secret, *, scopes: str = "all-apis",
                 endpoint_params: dict[str, str] | None = None) -> None:
        self.token_url, self.client_id, self.scopes = token_url, client_id, scopes
        self._client_secret = client_secret
        self._endpoint_params = dict(endpoint_params or {})

    def __repr__(self) -> str:
        return f"OAuthM2M(client_id={self.client_id!r}, token_url={self.token_url!r})"

    def __reduce__(self) -> tuple:
        # The client secret travels inside a Secret (as a token does), with the token held now, so
        # that a task starts with it and mints its own only when it is due.
        return (_unpickle_oauth_m2m, (self.token_url, self.client_id, self._client_secret, self.scopes,
                                      self._endpoint_params, self._header, self.issued_at, self.expires_at))

    def refresh(self) -> None:
        from databricks.sdk.oauth import ClientCredentials

        source = ClientCredentials(client_id=self.client_id, client_secret=self._client_secret.reveal(),
                                   token_url=self.token_url, scopes=self.scopes, use_header=True,
                                   endpoint_params=self._endpoint_params or None)
        self._mint(source, f"could not get an OAuth token from {self.token_url}")

    def secrets(self) -> list[Secret]:
        return [*super().secrets(), self._client_secret]

    def for_tasks(self) -> OAuthM2M:
        """Itself, with a token minted here if one is due."""
        self._mint_if_due()
        return self


def _unpickle_oauth_m2m(token_url: str, client_id: str, client_secret: Secret, scopes: str,
                        endpoint_params: dict[str, str], token: Secret | None, issued_at: float,
                        expires_at: float) -> OAuthM2M:
    """`OAuthM2M` as a task receives it: with the token the driver held, minting none."""
    creds = OAuthM2M(token_url, client_id, client_secret, scopes=scopes, endpoint_params=endpoint_params)
    creds._holding(token, issued_at, expires_at)
    return creds


class SdkCredentials(_KnownExpiry):
    """databricks-sdk's unified auth on the driver (a notebook's or job's own token, a CLI profile, Azure
    identities...): the SDK refreshes what it can each time it is asked. Its tasks get a `Snapshot`
    taken when their chunk starts (`for_tasks`); pickled, it is that snapshot. With a relay on the
    driver (`relay`: its URL and key, `jobs.endpoint.token_relay`) they get a `DriverRelay` instead, which asks
    the driver for its current token when theirs is refused or due."""

    relay: tuple[str, Secret] | None = None

    def __init__(self, config: Any) -> None:
        self._config = config
        self.refreshable = config.auth_type != "pat"  # a personal access token is what it is
        self.refresh()

    def __repr__(self) -> str:
        return f"SdkCredentials(auth_type={self.auth_type!r})"

    @property
    def auth_type(self) -> str:
        return str(self._config.auth_type)

    def __reduce__(self) -> tuple:
        return (_same, (self.for_tasks(),))

    def refresh(self) -> None:
        try:
            value = self._config.authenticate().get("Authorization")
        except Exception as exc:
            raise CredentialError(f"databricks-sdk ({self._config.auth_type}) could not authenticate: "
                                  f"{type(exc).__name__}") from None
        try:
            expiry = self._config.oauth_token().expiry
            expires_at = expiry.timestamp() if expiry else None
        except Exception:  # not an OAuth method: the SDK knows no expiry
            expires_at = None
        self._told(value, expires_at)

    def for_tasks(self) -> Credentials:
        if self.due(time.time()):
            self.refresh()
        if self.relay is not None:
            return DriverRelay(*self.relay, header=self._header, expires_at=self.expires_at,
                               source=f"databricks-sdk {self._config.auth_type}")
        return Snapshot(self._header, self.expires_at, f"databricks-sdk {self._config.auth_type}")


def _same(value: Any) -> Any:
    return value


class DriverRelay(_KnownExpiry):
    """A task's view of credentials only the driver can refresh (a job's or notebook's own token, other
    unified auth): the header as the chunk started, and, when it is refused (401/403) or due, the
    driver's current one, fetched from the relay the job runs on the driver (`jobs.endpoint.token_relay`:
    `GET <url>` with the run's relay key). So a chunk that outlives a token goes on with the next."""

    def __init__(self, url: str, key: Secret, *, header: Secret | None, expires_at: float | None,
                 source: str = "") -> None:
        self.url, self._key, self.source = url, key, source
        self._header, self.expires_at = header, expires_at

    def __repr__(self) -> str:
        return f"DriverRelay(url={self.url!r}, source={self.source!r})"

    def refresh(self) -> None:
        import requests

        try:
            resp = requests.get(self.url, headers={"X-Relay-Key": self._key.reveal()}, timeout=(5, 30))
            body = resp.json() if resp.status_code == 200 else None
        except (requests.RequestException, ValueError) as exc:
            raise CredentialError(f"could not get the driver's token from {self.url}: {type(exc).__name__}") from None
        if not isinstance(body, dict):
            raise CredentialError(f"could not get the driver's token from {self.url}: HTTP {resp.status_code}")
        value, expires = body.get("authorization"), body.get("expires_at")
        self._told(value if isinstance(value, str) else None,
                   float(expires) if isinstance(expires, (int, float)) else None)

    def secrets(self) -> list[Secret]:
        return [*super().secrets(), self._key]


class DataPlaneToken(_Minted):
    """An OAuth token scoped to one route-optimized endpoint, as databricks-sdk's data-plane path gets one
    (`databricks.sdk.data_plane.DataPlaneEndpointTokenSource`): the workspace OAuth token of `upstream` is
    exchanged at `{host}/oidc/v1/token` (the JWT-bearer grant) for a token carrying the endpoint's
    `authorization_details`. Exchanged again `minted_margin` before it expires (a quarter of its life,
    at most 5 minutes), the upstream refreshed first when it is due; wherever it is, driver or task. An
    `OAuthM2M` upstream travels with it, so tasks refresh both on their own.
    """

    def __init__(self, upstream: Credentials, host: str, authorization_details: str) -> None:
        self.upstream, self.host, self.authorization_details = upstream, host.rstrip("/"), authorization_details

    def __repr__(self) -> str:
        return f"DataPlaneToken(host={self.host!r}, upstream={self.upstream!r})"

    def refresh(self) -> None:
        from databricks.sdk.data_plane import DataPlaneEndpointTokenSource
        from databricks.sdk.oauth import Token

        if self.upstream.due(time.time()) or self.upstream.header() is None:
            self.upstream.refresh()
        workspace = self.upstream.header()
        if workspace is None:
            raise CredentialError("no workspace token to exchange for the endpoint's")
        assertion = _credential(workspace.reveal())
        source = DataPlaneEndpointTokenSource(self.host, lambda: Token(access_token=assertion, token_type="Bearer"),
                                              self.authorization_details, disable_async=True)
        self._mint(source, f"could not exchange the workspace token for the endpoint's at "
                           f"{self.host}/oidc/v1/token")

    def secrets(self) -> list[Secret]:
        return [*super().secrets(), *self.upstream.secrets()]

    def for_tasks(self) -> DataPlaneToken:
        """A copy for the tasks with the upstream's own (`OAuthM2M` itself, else a snapshot), and a
        token exchanged here if one is due."""
        self._mint_if_due()
        shipped = DataPlaneToken(self.upstream.for_tasks(), self.host, self.authorization_details)
        shipped._holding(self._header, self.issued_at, self.expires_at)
        shipped.generation = self.generation
        return shipped
