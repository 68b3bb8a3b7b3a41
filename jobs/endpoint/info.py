"""What the workspace says about a serving endpoint, read once on the driver before any row is sent:
its AI Gateway rate limits, whether it is route-optimized (and its own URL), and its state.

`GET {host}/api/2.0/serving-endpoints/{name}` with the job's credentials, parsed with databricks-sdk's
own `ServingEndpointDetailed`. The limit that applies to this caller follows AI Gateway's documented
precedence ("Configure rate limits"), for calls and tokens each: the endpoint's limit is a ceiling for
everyone; under it a custom limit naming this user or service principal overrides the per-user default,
higher or lower, and any group's; else its group's limit (shared by all members); else the default.
Who the caller is and its groups come from SCIM `Me`, read only when a limit names a principal. When
calls and tokens are both limited both are applied: the stricter binds. The job starts under the
result (`jobs.endpoint.resolve`), and the log says which limit applies and why. Nothing here is fatal unless
`endpoint.read_definition: true`: a workspace that cannot be read is logged and the run goes on with
its configured limits.

Example::

    info = read_endpoint("https://adb-1.azuredatabricks.net", "llm", {"Authorization": token})
    info.calls_per_minute, info.tokens_per_minute, info.invocation_url
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from udfs.auth import Secret, scrub

log = logging.getLogger("batch_inference")

# AI Gateway's only renewal period; a limit counted over another would not be per minute.
_PER_MINUTE = "minute"


class DefinitionUnavailable(Exception):
    """The endpoint's definition could not be read: the message says why, with no secret in it."""


@dataclass(frozen=True)
class EndpointInfo:
    name: str
    state: str = "unknown"
    route_optimized: bool = False
    endpoint_url: str | None = None
    # What databricks-sdk's data-plane path reads: the scope a token must carry to query the endpoint
    # (`data_plane_info.query_info.authorization_details`), and its URL there.
    authorization_details: str | None = None
    data_plane_url: str | None = None
    # The workspace's id (the `x-databricks-org-id` its API answers with): part of a route-optimized URL.
    workspace_id: str | None = None
    scale_to_zero: bool = False
    # The lowest AI Gateway limits that apply to this caller, per minute; None: no such limit.
    calls_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # Every limit found, as `120 calls/min per endpoint`, applied or not (for the log).
    limits: tuple[str, ...] = field(default_factory=tuple)
    ignored: tuple[str, ...] = field(default_factory=tuple)
    # Which limit applies to this caller, and why (for the log).
    applied: tuple[str, ...] = field(default_factory=tuple)

    @property
    def invocation_url(self) -> str | None:
        """The route-optimized URL to call: `https://<id>.<region>.serving.../<workspace-id>/serving-endpoints
        /<name>/invocations`. Databricks gives it whole (`endpoint_url`, or the data plane's); a bare
        host is completed with the workspace id and the usual path; None if it cannot be (no host, or
        no workspace id)."""
        if not self.route_optimized:
            return None
        for given in (self.endpoint_url, self.data_plane_url):
            if given and given.rstrip("/").endswith("/invocations"):
                return given.rstrip("/")
        if not self.endpoint_url or not self.workspace_id:
            return None
        url = self.endpoint_url.rstrip("/")
        if not url.endswith(f"/{self.workspace_id}"):
            url = f"{url}/{self.workspace_id}"
        return f"{url}/serving-endpoints/{self.name}/invocations"

    def describe(self) -> str:
        parts = [f"state {self.state}"]
        if self.route_optimized:
            parts.append(f"route-optimized at {self.invocation_url or self.endpoint_url or '(no endpoint_url)'}")
        if self.scale_to_zero:
            parts.append("scales to zero (the first requests may meet a cold start: 503s for minutes)")
        parts.append("AI Gateway limits: " + (", ".join(self.limits) if self.limits else "none"))
        if self.applied:
            parts.append("applies: " + "; ".join(self.applied))
        if self.ignored:
            parts.append("not applied: " + ", ".join(self.ignored))
        return "; ".join(parts)


def _get(url: str, headers: Mapping[str, Secret | str], timeout_s: float):  # -> requests.Response
    import requests

    secrets = [v for v in headers.values() if isinstance(v, Secret)]
    sent = {k: v.reveal() if isinstance(v, Secret) else v for k, v in headers.items()}
    try:
        resp = requests.get(url, headers=sent, timeout=(timeout_s, 3 * timeout_s), allow_redirects=False)
    except requests.RequestException as exc:
        raise DefinitionUnavailable(f"GET {url}: {type(exc).__name__}") from None
    if resp.status_code != 200:
        raise DefinitionUnavailable(scrub(f"GET {url}: HTTP {resp.status_code}: {resp.text[:200]}", secrets))
    return resp


def read_endpoint(host: str, name: str, headers: Mapping[str, Secret | str], *, principal: str | None = None,
                  workspace_id: str | None = None, timeout_s: float = 10.0) -> EndpointInfo:
    """The endpoint's definition; `principal` is this caller's service principal (application id), if
    known; `workspace_id` if known (the workspace's answer names it too). Raises `DefinitionUnavailable`."""
    url = f"{host.rstrip('/')}/api/2.0/serving-endpoints/{name}"
    resp = _get(url, headers, timeout_s)
    workspace_id = resp.headers.get("x-databricks-org-id") or workspace_id
    try:
        body = resp.json()
        parse_endpoint(body)
    except (ValueError, TypeError, AttributeError) as exc:
        raise DefinitionUnavailable(f"GET {url}: not an endpoint's definition ({type(exc).__name__})") from None
    names: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    if _needs_identity(body):
        try:
            names, groups = whoami(host, headers, timeout_s=timeout_s)
        except DefinitionUnavailable as exc:  # the limits naming principals cannot be matched: say so
            log.warning("endpoint %s: who the job runs as is unknown (%s); custom and group AI Gateway "
                        "limits are matched on %s only", name, exc, principal or "nothing")
    return parse_endpoint(body, principal=principal, names=names, groups=groups, workspace_id=workspace_id)


def whoami(host: str, headers: Mapping[str, Secret | str], *, timeout_s: float = 10.0
           ) -> tuple[frozenset[str], frozenset[str]]:
    """The caller's names (user name, service principal application id) and its groups, from
    `GET /api/2.0/preview/scim/v2/Me`; raises `DefinitionUnavailable`."""
    url = f"{host.rstrip('/')}/api/2.0/preview/scim/v2/Me"
    resp = _get(url, headers, timeout_s)
    try:
        me = resp.json()
        names = {me.get(k) for k in ("userName", "applicationId") if isinstance(me.get(k), str)}
        groups = {g.get("display") for g in me.get("groups") or [] if isinstance(g, dict)}
    except (ValueError, TypeError, AttributeError) as exc:
        raise DefinitionUnavailable(f"GET {url}: not a SCIM user ({type(exc).__name__})") from None
    return frozenset(n for n in names if n), frozenset(g for g in groups if isinstance(g, str) and g)


def _needs_identity(body: dict) -> bool:
    limits = ((body.get("ai_gateway") or {}).get("rate_limits") or []) if isinstance(body, dict) else []
    return any(isinstance(lim, dict) and lim.get("principal") for lim in limits)


# AI Gateway limits calls and tokens each; its precedence is applied to each on its own.
_DIMENSIONS = ("calls", "tokens")
# A limit's level of precedence for this caller: the endpoint's ceiling over everyone, then a custom
# limit naming the caller, its group's, the default per-user limit.
_LEVELS = ("endpoint", "custom", "group", "default")
# The limits of one level on one dimension: (the value per minute, the limit's text for the log).
_Found = list[tuple[int, str]]


def parse_endpoint(body: dict, *, principal: str | None = None, names: frozenset[str] | set[str] = frozenset(),
                   groups: frozenset[str] | set[str] = frozenset(), workspace_id: str | None = None) -> EndpointInfo:
    """`ServingEndpointDetailed` as JSON -> `EndpointInfo`, under AI Gateway's precedence.

    For calls and for tokens each: the endpoint's limit is a ceiling over everyone; under it, a custom
    limit naming this caller (a user or service principal: `principal`, or one of `names`) overrides
    the user default, higher or lower, and any group limit; else a limit of one of its `groups` (shared
    with every other member; in several groups, the highest: AI Gateway refuses only when all are
    exceeded); else the default per-user limit. Calls and tokens are both applied, so the stricter binds.
    """
    from databricks.sdk.service.serving import ServingEndpointDetailed

    ep = ServingEndpointDetailed.from_dict(body)
    me = set(names) | ({principal} if principal else set())
    limits = (ep.ai_gateway.rate_limits or []) if ep.ai_gateway is not None else []
    levels, found, ignored = _sort_limits(limits, me, groups)
    chosen: dict[str, int | None] = {}
    why: list[str] = []
    for d in _DIMENSIONS:
        chosen[d], reason = _apply_precedence(d, levels[d])
        why += [reason] if reason else []
    if chosen["calls"] and chosen["tokens"]:
        even = chosen["tokens"] / chosen["calls"]
        why.append(f"both apply, the stricter binds: the tokens limit for requests of more than {even:.0f} "
                   "tokens, the calls limit below")
    query = ep.data_plane_info.query_info if ep.data_plane_info is not None else None
    entities = (ep.config.served_entities or []) if ep.config is not None else []
    return EndpointInfo(
        name=ep.name or "", state=_state(ep), route_optimized=bool(ep.route_optimized),
        endpoint_url=ep.endpoint_url,
        authorization_details=query.authorization_details if query is not None else None,
        data_plane_url=query.endpoint_url if query is not None else None, workspace_id=workspace_id,
        scale_to_zero=any(e.scale_to_zero_enabled for e in entities),
        calls_per_minute=chosen["calls"], tokens_per_minute=chosen["tokens"],
        limits=tuple(found), ignored=tuple(ignored), applied=tuple(why))


def _state(ep: Any) -> str:
    """`READY`, or `NOT_READY (IN_PROGRESS)` while a config update rolls out; `unknown` if not said."""
    if ep.state is None:
        return "unknown"
    ready = ep.state.ready.value if ep.state.ready else "unknown"
    update = ep.state.config_update.value if ep.state.config_update else None
    return ready + (f" ({update})" if update and update != "NOT_UPDATING" else "")


def _sort_limits(limits: list[Any], me: set[str], groups: frozenset[str] | set[str]
                 ) -> tuple[dict[str, dict[str, _Found]], list[str], list[str]]:
    """Each AI Gateway limit under its level for this caller (dimension -> level -> [(value, text)]),
    with the texts of the limits that apply and of those that do not."""
    levels: dict[str, dict[str, _Found]] = {d: {lv: [] for lv in _LEVELS} for d in _DIMENSIONS}
    found: list[str] = []
    ignored: list[str] = []
    for lim in limits:
        text, level = _limit_text(lim), _level(lim, me, groups)
        if level is None:
            ignored.append(text + (" (not this caller)" if _period(lim) == _PER_MINUTE else ""))
            continue
        found.append(text)
        for d in _DIMENSIONS:
            n = getattr(lim, d)
            if n is not None:
                levels[d][level].append((n, text))
    return levels, found, ignored


def _key(lim: Any) -> str:
    return lim.key.value if lim.key is not None else "endpoint"


def _period(lim: Any) -> str:
    return lim.renewal_period.value if lim.renewal_period is not None else _PER_MINUTE


def _limit_text(lim: Any) -> str:
    """A limit as the log shows it: `120 calls/min, 5000 tokens/min per user_group analysts`."""
    period = _period(lim)
    per = "min" if period == _PER_MINUTE else period
    whom = f"per {_key(lim)}" + (f" {lim.principal}" if lim.principal else "")
    return ", ".join(f"{n} {unit}/{per}" for n, unit in ((lim.calls, "calls"), (lim.tokens, "tokens"))
                     if n is not None) + f" {whom}"


def _level(lim: Any, me: set[str], groups: frozenset[str] | set[str]) -> str | None:
    """The limit's level of precedence for this caller (`_LEVELS`), or None if it does not apply: it
    names another principal or a group the caller is not in, or is not counted per minute."""
    key = _key(lim)
    if _period(lim) != _PER_MINUTE:
        return None  # AI Gateway's windows are a minute; another would not be per minute
    if key == "endpoint":
        return "endpoint"
    if key in ("user", "service_principal"):
        return "default" if not lim.principal else ("custom" if lim.principal in me else None)
    if key == "user_group" and lim.principal in groups:
        return "group"
    return None


def _apply_precedence(d: str, lv: dict[str, _Found]) -> tuple[int | None, str | None]:
    """The limit on `d` (calls or tokens) per minute for this caller, and why, from its limits by level:
    the caller's own (custom, else its groups', else the default) under the endpoint's ceiling."""
    mine = _lowest(lv["custom"]) or _highest(lv["group"]) or _lowest(lv["default"])
    source = ("a custom limit for this caller (it overrides the default and any group's)" if lv["custom"]
              else "its group's limit, shared with the group's other members" if lv["group"]
              else "the default per-user limit" if lv["default"] else None)
    ceiling = _lowest(lv["endpoint"])
    if mine and ceiling and ceiling[0] < mine[0]:
        return ceiling[0], (f"{ceiling[0]} {d}/min: the endpoint's ceiling ({ceiling[1]}) is below {source} "
                            f"({mine[1]})")
    if mine:
        return mine[0], (f"{mine[0]} {d}/min: {source} ({mine[1]})"
                         + (f", under the endpoint's ceiling of {ceiling[0]}" if ceiling else ""))
    if ceiling:
        return ceiling[0], f"{ceiling[0]} {d}/min: the endpoint's ceiling ({ceiling[1]})"
    return None, None


def _lowest(found: _Found) -> tuple[int, str] | None:
    """A level's binding limit: its lowest (the first of equals); None if it has none."""
    return min(found, key=lambda v: v[0], default=None)


def _highest(found: _Found) -> tuple[int, str] | None:
    """A group level's binding limit: its highest (AI Gateway refuses only when every group's is exceeded)."""
    return max(found, key=lambda v: v[0], default=None)
