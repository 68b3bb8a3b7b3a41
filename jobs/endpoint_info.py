"""What the workspace says about a serving endpoint, read once on the driver before any row is sent:
its AI Gateway rate limits, whether it is route-optimized (and its own URL), and its state.

`GET {host}/api/2.0/serving-endpoints/{name}` with the job's credentials, parsed with databricks-sdk's
own `ServingEndpointDetailed`. The limits that apply to this caller are those keyed on the endpoint
(shared by every caller), and those keyed on a user or service principal without a `principal` (the
default for each) or naming this caller's service principal; a `user_group` limit is logged but not
applied (the job cannot tell its groups). The lowest that applies is the one the job starts under
(`jobs.resolve`). Nothing here is fatal unless `endpoint.read_definition: true`: a workspace that
cannot be read is logged and the run goes on with its configured limits.

Example::

    info = read_endpoint("https://adb-1.azuredatabricks.net", "llm", {"Authorization": token})
    info.calls_per_minute, info.tokens_per_minute, info.invocation_url
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from udfs.auth import Secret, scrub

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
    scale_to_zero: bool = False
    # The lowest AI Gateway limits that apply to this caller, per minute; None: no such limit.
    calls_per_minute: int | None = None
    tokens_per_minute: int | None = None
    # Every limit found, as `120 calls/min per endpoint`, applied or not (for the log).
    limits: tuple[str, ...] = field(default_factory=tuple)
    ignored: tuple[str, ...] = field(default_factory=tuple)

    @property
    def invocation_url(self) -> str | None:
        """The route-optimized URL to call (Databricks gives the whole invocations URL; a bare host
        is completed with the usual path)."""
        if not (self.route_optimized and self.endpoint_url):
            return None
        url = self.endpoint_url.rstrip("/")
        return url if url.endswith("/invocations") else f"{url}/serving-endpoints/{self.name}/invocations"

    def describe(self) -> str:
        parts = [f"state {self.state}"]
        if self.route_optimized:
            parts.append(f"route-optimized at {self.invocation_url or '(no endpoint_url)'}")
        if self.scale_to_zero:
            parts.append("scales to zero (the first requests may meet a cold start: 503s for minutes)")
        parts.append("AI Gateway limits: " + (", ".join(self.limits) if self.limits else "none"))
        if self.ignored:
            parts.append("not applied: " + ", ".join(self.ignored))
        return "; ".join(parts)


def read_endpoint(host: str, name: str, headers: Mapping[str, Secret | str], *, principal: str | None = None,
                  timeout_s: float = 10.0) -> EndpointInfo:
    """The endpoint's definition; `principal` is this caller's service principal (application id), if
    known. Raises `DefinitionUnavailable`."""
    import requests

    secrets = [v for v in headers.values() if isinstance(v, Secret)]
    sent = {k: v.reveal() if isinstance(v, Secret) else v for k, v in headers.items()}
    url = f"{host.rstrip('/')}/api/2.0/serving-endpoints/{name}"
    try:
        resp = requests.get(url, headers=sent, timeout=(timeout_s, 3 * timeout_s), allow_redirects=False)
    except requests.RequestException as exc:
        raise DefinitionUnavailable(f"GET {url}: {type(exc).__name__}") from None
    if resp.status_code != 200:
        raise DefinitionUnavailable(scrub(f"GET {url}: HTTP {resp.status_code}: {resp.text[:200]}", secrets))
    try:
        return parse_endpoint(resp.json(), principal=principal)
    except (ValueError, TypeError, AttributeError) as exc:
        raise DefinitionUnavailable(f"GET {url}: not an endpoint's definition ({type(exc).__name__})") from None


def parse_endpoint(body: dict, *, principal: str | None = None) -> EndpointInfo:
    """`ServingEndpointDetailed` as JSON -> `EndpointInfo`."""
    from databricks.sdk.service.serving import ServingEndpointDetailed

    ep = ServingEndpointDetailed.from_dict(body)
    state = "unknown"
    if ep.state is not None:
        ready = ep.state.ready.value if ep.state.ready else "unknown"
        update = ep.state.config_update.value if ep.state.config_update else None
        state = ready + (f" ({update})" if update and update != "NOT_UPDATING" else "")
    entities = (ep.config.served_entities or []) if ep.config is not None else []
    calls: list[int] = []
    tokens: list[int] = []
    found: list[str] = []
    ignored: list[str] = []
    limits = (ep.ai_gateway.rate_limits or []) if ep.ai_gateway is not None else []
    for lim in limits:
        key = lim.key.value if lim.key is not None else "endpoint"
        whom = f"per {key}" + (f" {lim.principal}" if lim.principal else "")
        period = lim.renewal_period.value if lim.renewal_period is not None else _PER_MINUTE
        per = "min" if period == _PER_MINUTE else period
        text = ", ".join(f"{n} {unit}/{per}" for n, unit in ((lim.calls, "calls"), (lim.tokens, "tokens"))
                         if n is not None) + f" {whom}"
        applies = period == _PER_MINUTE and (
            key == "endpoint"
            or (key in ("user", "service_principal") and (not lim.principal or lim.principal == principal)))
        (found if applies else ignored).append(text)
        if applies:
            calls += [lim.calls] if lim.calls is not None else []
            tokens += [lim.tokens] if lim.tokens is not None else []
    return EndpointInfo(
        name=ep.name or "", state=state, route_optimized=bool(ep.route_optimized), endpoint_url=ep.endpoint_url,
        scale_to_zero=any(e.scale_to_zero_enabled for e in entities),
        calls_per_minute=min(calls) if calls else None, tokens_per_minute=min(tokens) if tokens else None,
        limits=tuple(found), ignored=tuple(ignored))
