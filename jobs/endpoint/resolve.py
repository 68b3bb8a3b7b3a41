"""Resolving the endpoint: from endpoint config to an `EngineSpec`, the URL to call and its credentials.

Runs on the driver. Credentials are resolved with databricks-sdk's `Config` (PAT, OAuth for service
principals, CLI profiles, notebook context) or from a named environment variable or secret scope, and
travel to the executors only inside `Secret`s. A service principal's OAuth (`oauth-m2m`) becomes
`udfs.auth.OAuthM2M`, which every task refreshes on its own before its token expires; other unified
auth becomes `SdkCredentials`, whose tasks get the driver's current token at each chunk. Static tokens
(`token_env`, `token_secret`, a PAT) are plain headers, as they always were.

For a serving endpoint reached through the workspace, its definition is read first
(`jobs.endpoint.info`): the job starts under its AI Gateway rate limits, and a route-optimized
endpoint is called at its own URL, with an OAuth token scoped to it (exchanged from the workspace's).
What no retry could fix is refused here, before any row is sent: a header value with a line break, a
personal access token or the job's own runtime token for a route-optimized endpoint, and
(`preflight`) a TLS certificate the job does not trust.

Example::

    spec = engine_spec(cfg, spark)     # spark only to read the cluster id for driver-proxy apps
    preflight(spec)                    # one connection (and TLS handshake), no request
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import fields
from typing import Any, Mapping
from urllib.parse import urlsplit

from jobs.config import ConfigError, EndpointConfig, JobConfig, LimitsConfig
from jobs.endpoint.info import DefinitionUnavailable, EndpointInfo, read_endpoint
from jobs.session import conf_get, on_databricks
from udfs.auth import CredentialError, Credentials, DataPlaneToken, OAuthM2M, SdkCredentials, Secret, Snapshot, bearer
from udfs.budget import BudgetSpec
from udfs.spec import EngineSpec, RetrySpec
from udfs.transforms import import_function
from udfs.loopback import is_loopback
from udfs.transport import FATAL_KINDS, TransportError, connect_probe, header_problem

log = logging.getLogger("batch_inference")

# Under an endpoint's AI Gateway limits the learned request rate starts, and tokens are paced, at this
# fraction of them; the request rate's ceiling stays the limit itself.
GATEWAY_START_FRACTION = 0.9


def normalize_host(host: str) -> str:
    """`adb-1.azuredatabricks.net/` -> `https://adb-1.azuredatabricks.net` (a prefix, not lstrip)."""
    host = host.strip().rstrip("/")
    if not host.startswith(("http://", "https://")):
        host = "https://" + host
    return host


def _sdk_config(host: str | None = None) -> Any:
    from databricks.sdk.config import Config

    try:
        return Config(host=host) if host else Config()
    except Exception as exc:  # the SDK says which auth methods it tried; it does not echo secrets
        raise ConfigError(f"endpoint.auth: could not resolve Databricks credentials: {exc}") from None


def workspace_host(e: EndpointConfig) -> str:
    if e.host:
        return normalize_host(e.host)
    host = _sdk_config().host
    if not host:
        raise ConfigError("endpoint.host: not set, and databricks-sdk found no host (set DATABRICKS_HOST)")
    return normalize_host(host)


def cluster_id(e: EndpointConfig, spark: Any | None) -> str:
    if e.cluster_id:
        return e.cluster_id
    if spark is not None:
        cid = conf_get(spark, "spark.databricks.clusterUsageTags.clusterId")
        if cid:
            return cid
    raise ConfigError("endpoint.cluster_id: not set and not found in the Spark conf "
                      "(spark.databricks.clusterUsageTags.clusterId)")


def endpoint_url(e: EndpointConfig, spark: Any | None = None) -> str:
    if e.url:
        return e.url
    if e.type == "serving":
        return f"{workspace_host(e)}/serving-endpoints/{e.name}/invocations"
    if on_databricks() or e.cluster_id or e.host:
        return f"{workspace_host(e)}/driver-proxy-api/o/0/{cluster_id(e, spark)}/{e.port}/"
    return f"http://127.0.0.1:{e.port}/"


def _dbutils() -> Any:
    """The runtime's own dbutils on Databricks; elsewhere databricks-sdk's REST stand-in.

    Databricks serves secret values through dbutils (its secrets-get API is documented as refusing
    ordinary callers outside it), so on a cluster or serverless the runtime's dbutils is the one to
    use. Off Databricks, `WorkspaceClient().dbutils` sends the same request with unified auth, which
    the workspace may refuse.
    """
    if on_databricks():
        from databricks.sdk.runtime import dbutils

        return dbutils
    from databricks.sdk import WorkspaceClient

    return WorkspaceClient().dbutils


def _secret_from_scope(scope: str, key: str) -> Secret:
    try:
        value = _dbutils().secrets.get(scope=scope, key=key)
    except Exception as exc:  # the type only: an error message could quote what it read
        raise ConfigError(f"endpoint.token_secret: cannot read secret {scope}/{key}: "
                          f"{type(exc).__name__}") from None
    if not value:
        raise ConfigError(f"endpoint.token_secret: secret {scope}/{key} is empty")
    return Secret(value)


def credentials(e: EndpointConfig, url: str) -> tuple[dict[str, Secret | str], Credentials | None]:
    """The static headers and the refreshable credentials to call `url` with (one of them empty)."""
    if e.token_env:
        value = os.environ.get(e.token_env)
        if not value:
            raise ConfigError(f"endpoint.token_env: environment variable {e.token_env} is not set or empty")
        return bearer(Secret(value)), None
    if e.token_secret:
        return bearer(_secret_from_scope(e.token_secret.scope, e.token_secret.key)), None
    mode = e.auth
    if mode == "auto":
        mode = "none" if is_loopback(url) else "databricks"
    if mode == "none":
        return {}, None
    host = f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
    config = _sdk_config(e.host and normalize_host(e.host) or host)
    try:
        if config.auth_type == "oauth-m2m" and config.client_id and config.client_secret:
            return {}, _oauth_m2m_from_sdk(config)
        return {}, SdkCredentials(config)
    except CredentialError as exc:
        raise ConfigError(f"endpoint.auth: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"endpoint.auth: Databricks authentication failed: {type(exc).__name__}") from None


def _oauth_m2m_from_sdk(config: Any) -> OAuthM2M:
    """The service principal's client credentials, as databricks-sdk's `oauth-m2m` strategy uses them
    (its token endpoint, scopes, group), minted here once: a bad secret fails before any row."""
    group = getattr(config, "group_id", None)
    creds = OAuthM2M(config.databricks_oidc_endpoints.token_endpoint, config.client_id,
                     Secret(config.client_secret), scopes=config.get_scopes_as_string(),
                     endpoint_params={"assume_group": group} if group else None)
    creds.refresh()
    return creds


def current_headers(headers: Mapping[str, Secret | str], creds: Credentials | None) -> dict[str, Secret | str]:
    """The static headers with the credentials' token as it is at this moment, if they give one."""
    current = creds.header() if creds is not None else None
    return {**headers, "Authorization": current} if current is not None else dict(headers)


def auth_headers(e: EndpointConfig, url: str) -> dict[str, Secret | str]:
    """Every header the credentials give now (a refreshable token as it is at this moment)."""
    return current_headers(*credentials(e, url))


def check_transforms(e: EndpointConfig) -> None:
    """Import the transforms on the driver so a typo fails before any endpoint is called."""
    for key in ("transform_input", "transform_output"):
        ref = getattr(e, key)
        if ref:
            try:
                import_function(ref)
            except ImportError as exc:
                raise ConfigError(f"endpoint.{key}: {exc}") from None


def _credential_source(e: EndpointConfig) -> str:
    if e.token_env:
        return f"endpoint.token_env (environment variable {e.token_env})"
    if e.token_secret:
        return f"endpoint.token_secret ({e.token_secret.scope}/{e.token_secret.key})"
    return "endpoint.auth (the credentials databricks-sdk resolved)"


def refuse_unsendable_headers(e: EndpointConfig, headers: Mapping[str, Secret | str]) -> None:
    """A header value with a line break would inject headers (a token file's trailing newline): refuse
    it here, as a `ConfigError` naming where the value came from and never the value. The same rule
    as `udfs.transport.check_headers`, which refuses it again where it is sent."""
    for name, value in headers.items():
        problem = header_problem(name, value.reveal() if isinstance(value, Secret) else value)
        if problem:
            raise ConfigError(f"{_credential_source(e)}: {problem}")


# A refused connection at start is tried again for this long (a server still binding its port).
REACH_RETRY_S = 3.0


def preflight(spec: EngineSpec, *, retry_s: float = REACH_RETRY_S) -> None:
    """Before the first chunk: open one connection to the endpoint (through the proxy if one applies)
    and, for https, complete the TLS handshake; no request is sent, no row's budget is spent.

    Both ways a run could never succeed are a `ConfigError`, within seconds, before any row:

    - a certificate the job does not trust, or a handshake that cannot succeed;
    - nothing answering at the endpoint (connection refused, no such host, a connect timeout),
      tried again for `retry_s`. An endpoint that has never answered is a wrong URL or port or a
      server not started: `retry.breaker_s` (minutes) is for one that answered once and went away.
      A serving endpoint scaled to zero passes: its gateway accepts connections and answers 503.
    """
    parts = urlsplit(spec.url)
    where = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"
    deadline = time.monotonic() + retry_s
    while True:
        try:
            connect_probe(spec.url, spec.connect_timeout_s)
            return
        except TransportError as exc:
            if exc.fatal:
                raise ConfigError(f"endpoint {where}: {exc.detail}") from None
            if not exc.unreachable:  # connected, then cut short: the endpoint is there
                log.warning("endpoint %s: pre-flight connection: %s; going on", where, exc)
                return
            if time.monotonic() >= deadline:
                raise ConfigError(unreachable_text(where, spec.url, exc)) from None
        time.sleep(0.5)


def unreachable_text(where: str, url: str, exc: TransportError) -> str:
    """Why the run stops on an endpoint nothing answers at, and what to check."""
    hint = (" (the local stand-in: python -m jobs.local.stand_in --port "
            f"{urlsplit(url).port or 80})" if is_loopback(url) else "")
    return (f"endpoint {where}: nothing answers there ({exc.detail}); no row was sent. Is the endpoint "
            f"running{hint}, and are its URL, host and port right?")


_FATAL_IN_TASK = re.compile(r"TransportError: ((?:%s): [^\n]*)" % "|".join(sorted(FATAL_KINDS)))


def fatal_in(exc: BaseException) -> str | None:
    """The fatal transport error that stopped a Spark task, as its one line, out of the Python and
    Java stacks Spark wraps it in; None if `exc` is something else."""
    m = _FATAL_IN_TASK.search(str(exc))
    return m.group(1) if m else None


def endpoint_definition(e: EndpointConfig, url: str, headers: Mapping[str, Secret | str],
                        creds: Credentials | None) -> EndpointInfo | None:
    """The serving endpoint's definition from the workspace, logged; None if not read (or unreadable,
    unless `endpoint.read_definition: true`)."""
    wanted = e.read_definition
    if wanted is False or (wanted is None and (e.type != "serving" or e.url)):
        return None
    host = normalize_host(e.host) if e.host else f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
    auth = current_headers(headers, creds)
    principal = creds.client_id if isinstance(creds, OAuthM2M) else None
    try:
        info = read_endpoint(host, e.name, auth, principal=principal)
    except DefinitionUnavailable as exc:
        if wanted:
            raise ConfigError(f"endpoint.read_definition: {exc}") from None
        log.warning("endpoint %s: could not read its definition (%s); going on with the configured limits",
                    e.name, exc)
        return None
    log.info("endpoint %s: %s", e.name, info.describe())
    return info


_INSTEAD = ("use a service principal's OAuth M2M (DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET in the "
            "job's environment, from a secret scope; README \"Deploy to Databricks\"), or set endpoint.url to "
            "call the workspace URL (endpoints created before 2025-09-22 only)")


def _require_oauth(e: EndpointConfig, headers: Mapping[str, Secret | str], creds: Credentials | None) -> None:
    """Databricks accepts only OAuth tokens scoped to the endpoint at a route-optimized endpoint's URL,
    exchanged from a workspace OAuth token: refuse here, rather than fail every row with 401, a personal
    access token and the job's own `runtime` token (the notebook/job token: not OAuth, not exchangeable)."""
    token = headers.get("Authorization")
    pat = (isinstance(token, Secret) and token.reveal().split(" ")[-1].startswith("dapi")) or (
        isinstance(creds, SdkCredentials) and creds.auth_type == "pat")
    if pat:
        raise ConfigError(f"endpoint {e.name} is route-optimized: Databricks accepts only OAuth tokens at its "
                          f"URL, and {_credential_source(e)} gives a personal access token; {_INSTEAD}")
    if isinstance(creds, SdkCredentials) and creds.auth_type == "runtime":
        raise ConfigError(f"endpoint {e.name} is route-optimized: Databricks accepts only OAuth tokens scoped to "
                          f"the endpoint at its URL, and {_credential_source(e)} gives the job's own runtime "
                          f"token, which is not OAuth and cannot be exchanged for one; {_INSTEAD}")


def _route_optimized(e: EndpointConfig, info: EndpointInfo, host: str, headers: dict[str, Secret | str],
                     creds: Credentials | None) -> tuple[str | None, dict[str, Secret | str], Credentials | None]:
    """The URL, headers and credentials to call a route-optimized endpoint with: its own URL, and a token
    scoped to it (`udfs.auth.DataPlaneToken`), exchanged once here so that a refusal fails before any row.
    The URL is None when the endpoint gives none (the workspace URL then serves, as it does endpoints
    created before 2025-09-22)."""
    target = info.invocation_url
    if target is None:
        if info.endpoint_url:
            raise ConfigError(f"endpoint {e.name} is route-optimized at {info.endpoint_url}, but the workspace id "
                              "that completes its URL is unknown; set endpoint.url to its invocations URL")
        log.warning("endpoint %s is route-optimized but gives no endpoint_url: calling the workspace URL", e.name)
        return None, headers, creds
    _require_oauth(e, headers, creds)
    if not info.authorization_details:
        log.warning("endpoint %s: route-optimized: calling %s with the workspace token (its definition gives no "
                    "data_plane_info.query_info.authorization_details to exchange it for)", e.name, target)
        return target, headers, creds
    upstream = creds
    if upstream is None:
        token = headers.get("Authorization")
        if not isinstance(token, Secret):
            raise ConfigError(f"endpoint {e.name} is route-optimized: it needs an OAuth token, and "
                              f"{_credential_source(e)} gives none; {_INSTEAD}")
        upstream = Snapshot(token, source=_credential_source(e))
    scoped = DataPlaneToken(upstream, host, info.authorization_details)
    try:
        scoped.refresh()
    except CredentialError as exc:
        raise ConfigError(f"endpoint {e.name} is route-optimized: {exc}; {_INSTEAD}") from None
    log.info("endpoint %s: route-optimized: calling %s with a token scoped to it (exchanged at %s/oidc/v1/token, "
             "again before it expires)", e.name, target, host)
    return target, {k: v for k, v in headers.items() if k != "Authorization"}, scoped


def _rates(e: EndpointConfig, lim: LimitsConfig, info: EndpointInfo | None
           ) -> tuple[float | None, float | None, float | None]:
    """Requests/s (a ceiling), tokens/s, and where the learned rate starts: the config's limits, else
    the endpoint's own (the ceiling at its limit, the start and the tokens at `GATEWAY_START_FRACTION`)."""
    rps = lim.requests_per_minute / 60 if lim.requests_per_minute else None
    tps = lim.tokens_per_minute / 60 if lim.tokens_per_minute else None
    start = None
    if info is not None and info.calls_per_minute and not lim.requests_per_minute:
        rps, start = info.calls_per_minute / 60, GATEWAY_START_FRACTION * info.calls_per_minute / 60
        log.info("endpoint %s: starting at %.0f requests/min (%g of its AI Gateway limit), never above %d; "
                 "limits.requests_per_minute overrides", e.name, start * 60, GATEWAY_START_FRACTION,
                 info.calls_per_minute)
    if info is not None and info.tokens_per_minute and not lim.tokens_per_minute:
        tps = GATEWAY_START_FRACTION * info.tokens_per_minute / 60
        log.info("endpoint %s: pacing tokens at %.0f/min (%g of its AI Gateway limit); "
                 "limits.tokens_per_minute overrides", e.name, tps * 60, GATEWAY_START_FRACTION)
    return rps, tps, start


def engine_spec(cfg: JobConfig, spark: Any | None = None) -> EngineSpec:
    """The primary endpoint's spec (the run's only one, unless `endpoints` lists several)."""
    return next(s for s in engine_specs(cfg, spark) if s.role == "primary")


def engine_specs(cfg: JobConfig, spark: Any | None = None) -> list[EngineSpec]:
    """One spec per endpoint of the run, in config order, each with its role and its own limits; every
    endpoint's URL and credentials are resolved here, so a bad one fails before any row is sent."""
    return [route_spec(cfg, r.endpoint, r.limits, r.role, spark) for r in cfg.routes()]


def route_spec(cfg: JobConfig, e: EndpointConfig, lim: LimitsConfig, role: str = "primary",
               spark: Any | None = None) -> EngineSpec:
    r = cfg.retry
    check_transforms(e)
    url = endpoint_url(e, spark)
    headers, creds = credentials(e, url)
    refuse_unsendable_headers(e, current_headers(headers, creds))
    info = endpoint_definition(e, url, headers, creds)
    if info is not None and info.route_optimized and not e.url:
        host = normalize_host(e.host) if e.host else f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"
        target, headers, creds = _route_optimized(e, info, host, headers, creds)
        url = target or url
    requests_per_s, tokens_per_s, start = _rates(e, lim, info)
    if lim.input_tokens_per_minute or lim.output_tokens_per_minute:
        log.info("endpoint %s: input and output tokens paced as separate budgets: %s input, %s output tokens/min",
                 e.name, f"{lim.input_tokens_per_minute:.0f}" if lim.input_tokens_per_minute else "unlimited",
                 f"{lim.output_tokens_per_minute:.0f}" if lim.output_tokens_per_minute else "unlimited")
    rf = e.response_format
    return EngineSpec(
        # The fields both sides name alike (name, task, system_prompt, the transforms; max_concurrency,
        # the time-outs, adaptive, latency_cut_factor, http_client), then what config says otherwise.
        **same_named(e, lim),
        url=url,
        role=role,
        endpoint_type=e.type,
        headers=headers,
        credentials=creds,
        model_kwargs=dict(e.model_kwargs),
        stop=tuple(e.stop),
        rows_per_request=e.rows_per_request,
        requests_per_s=requests_per_s,
        tokens_per_s=tokens_per_s,
        input_tokens_per_s=lim.input_tokens_per_minute / 60 if lim.input_tokens_per_minute else None,
        output_tokens_per_s=lim.output_tokens_per_minute / 60 if lim.output_tokens_per_minute else None,
        start_requests_per_s=start,
        # RetryConfig and RetrySpec have the same fields (tests/test_config.py holds them equal).
        retry=RetrySpec(**{**r.model_dump(), "statuses": tuple(r.statuses)}),
        response_schema=None if rf is None else rf.json_schema,
        response_format_name="response" if rf is None else rf.name,
        response_format_strict=True if rf is None else rf.strict,
        response_format_at=None if rf is None else rf.send_at,
        budget=budget_spec(cfg, e),
    )


# EngineSpec fields the config sets under another name or shape (in `route_spec`), never copied as is.
_NOT_COPIED = frozenset({"url", "role", "model_kwargs", "stop", "response_format", "batch_size"})


def same_named(*models: Any) -> dict[str, Any]:
    """The values of `models`' fields that `EngineSpec` has under the same name (plain values: no
    nested model), so a field added to both is carried without a line here."""
    wanted = {f.name for f in fields(EngineSpec)} - _NOT_COPIED
    return {k: getattr(m, k) for m in models for k in type(m).model_fields if k in wanted}


def budget_spec(cfg: JobConfig, e: EndpointConfig | None = None) -> BudgetSpec | None:
    """`run.budget` for the engine, at endpoint `e`'s prices per token (the primary's by default);
    None without a cap."""
    b, e = cfg.run.budget, e or cfg.endpoint
    if not b.caps:
        return None
    return BudgetSpec(max_cost=b.max_cost, max_input_tokens=b.max_input_tokens,
                      max_output_tokens=b.max_output_tokens, max_requests=b.max_requests,
                      price_in=(e.price_per_1k_prompt_tokens or 0.0) / 1000,
                      price_out=(e.price_per_1k_completion_tokens or 0.0) / 1000,
                      reserve_output_tokens=b.reserve_output_tokens)
