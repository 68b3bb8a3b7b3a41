"""Create or update a Databricks serving endpoint from a YAML spec (the `batch-inference-endpoint` library).

The spec is the body of `POST /api/2.0/serving-endpoints` written as YAML: `name`, `config` (with
`served_entities`, optional `traffic_config`), optional `tags`, `ai_gateway`, `route_optimized`. It is
the dictionary that LangChain's Databricks page and the Databricks docs pass to
`mlflow.deployments.get_deploy_client("databricks").create_endpoint(config=...)`, and it goes through
that same client (host and credentials from databricks-sdk: `DATABRICKS_HOST`/`DATABRICKS_TOKEN`,
OAuth, profiles).

Idempotent: an absent endpoint is created; a present one is compared with the spec's `config` and
updated (`PUT .../config`) only if something the spec sets differs; then it waits, with a timeout,
until the endpoint is ready. API keys in a spec must be `{{secrets/<scope>/<key>}}` references; a
literal key is refused before any request.

Example::

    change = ensure_endpoint(get_deploy_client("databricks"), load_spec("conf/endpoint_uc_model.yml"))

The console script is `jobs.cli.serving_endpoint`.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from jobs import secret_rules

log = logging.getLogger("batch_inference.serving")

# What a create request may carry; only `config` can be changed later through `PUT .../config`.
_TOP_KEYS = {"name", "config", "tags", "ai_gateway", "route_optimized", "budget_policy_id", "description"}
_CONFIG_KEYS = {"served_entities", "served_models", "traffic_config", "auto_capture_config"}
_PROVIDERS = {"ai21labs", "anthropic", "amazon-bedrock", "cohere", "custom", "databricks-model-serving",
              "google-cloud-vertex-ai", "openai", "palm"}


class SpecError(ValueError):
    """A spec that cannot be sent: the message names the key."""


class EndpointFailed(RuntimeError):
    """The endpoint did not become ready: a failed update, or the timeout."""


@dataclass
class EndpointChange:
    """What `ensure_endpoint` did to an endpoint, and the state it left it in."""

    name: str
    action: str  # created | updated | unchanged | would_create | would_update
    differences: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# -- the spec ----------------------------------------------------------------------------------------

def load_spec(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"--spec {path}: no such file")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:  # usually an unquoted {{secrets/...}}, which YAML reads as a mapping
        raise SpecError(f"{path}: not valid YAML (quote \"{{{{secrets/<scope>/<key>}}}}\" references): "
                        f"{exc}") from None
    check_spec(spec, str(path))
    return spec


def check_spec(spec: Any, source: str = "spec") -> None:
    """Refuse what Databricks would refuse, or what must never be sent (a literal key), naming the key."""
    if not isinstance(spec, dict):
        raise SpecError(f"{source}: expected a mapping with name and config")
    check_no_literal_keys(spec)
    unknown = sorted(set(spec) - _TOP_KEYS)
    if unknown:
        raise SpecError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}", name):
        raise SpecError(f"{source}: name must be 1-63 letters, digits, '-' or '_' (got {name!r})")
    config = spec.get("config")
    if not isinstance(config, dict):
        raise SpecError(f"{source}: config: missing; it holds served_entities")
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise SpecError(f"{source}: config: unknown key(s) {unknown}; allowed: {sorted(_CONFIG_KEYS)}")
    entities = config.get("served_entities")
    if not isinstance(entities, list) or not entities:
        raise SpecError(f"{source}: config.served_entities: a non-empty list is required")
    for i, entity in enumerate(entities):
        _check_entity(entity, f"config.served_entities[{i}]")


def _check_entity(entity: Any, where: str) -> None:
    if not isinstance(entity, dict):
        raise SpecError(f"{where}: expected a mapping")
    kinds = [k for k in ("external_model", "entity_name") if k in entity]
    if len(kinds) != 1:
        raise SpecError(f"{where}: give exactly one of external_model or entity_name (got {kinds or 'none'})")
    model = entity.get("external_model")
    if model is None:
        return
    if not isinstance(model, dict):
        raise SpecError(f"{where}.external_model: expected a mapping")
    for key in ("provider", "name", "task"):
        if not isinstance(model.get(key), str) or not model[key]:
            raise SpecError(f"{where}.external_model.{key}: missing")
    if model["provider"] not in _PROVIDERS:
        raise SpecError(f"{where}.external_model.provider: {model['provider']!r} is not one of "
                        f"{sorted(_PROVIDERS)}")


_ADVICE = {
    secret_rules.LITERAL_CREDENTIAL: "a literal credential is refused; write a secret reference "
                                     "\"{{{{secrets/<scope>/<key>}}}}\" instead",
    secret_rules.PLAINTEXT_FIELD: "plaintext credentials are refused; store the key in a secret scope and use "
                                  "{detail}: \"{{{{secrets/<scope>/<key>}}}}\"",
    secret_rules.TOKEN_SHAPED: "this value looks like a token; reference a secret scope instead",
    secret_rules.URL_CREDENTIAL: "this URL carries a credential ({detail}); reference a secret scope instead",
}


def check_no_literal_keys(spec: Any) -> None:
    """Credentials are `{{secrets/<scope>/<key>}}` references; the message never repeats a value."""
    for finding in secret_rules.find_secrets(spec):
        raise SpecError(f"{finding.path}: {_ADVICE[finding.kind].format(detail=finding.detail)}")


# -- comparing ---------------------------------------------------------------------------------------

def differences(desired: Any, actual: Any, path: str = "config") -> list[str]:
    """Where `actual` differs from what `desired` sets; keys the spec leaves out are the server's."""
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return [path]
        out: list[str] = []
        for key, value in desired.items():
            out += differences(value, actual.get(key), f"{path}.{key}")
        return out
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(actual) != len(desired):
            return [path]
        pairs = list(zip(desired, actual))
        if all(isinstance(d, dict) and d.get("name") for d in desired):
            # Served entities are matched by name: the server may list them in another order.
            by_name = {a.get("name"): a for a in actual if isinstance(a, dict)}
            pairs = [(d, by_name.get(d["name"])) for d in desired]
        out = []
        for i, (d, a) in enumerate(pairs):
            out += differences(d, a, f"{path}[{i}]")
        return out
    return [] if _scalar(desired) == _scalar(actual) else [path]


def _scalar(value: Any) -> str:
    """YAML `true` and the API's "true", `entity_version: 1` and the API's "1", compare equal."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)) or (isinstance(value, str) and re.fullmatch(r"-?\d+(\.\d+)?", value)):
        return repr(float(value))
    return str(value)


# -- talking to the workspace ------------------------------------------------------------------------

def _not_found(exc: Exception) -> bool:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status == 404 or "RESOURCE_DOES_NOT_EXIST" in str(exc)


def get_or_none(client: Any, name: str) -> dict[str, Any] | None:
    try:
        return dict(client.get_endpoint(endpoint=name))
    except Exception as exc:
        if _not_found(exc):
            return None
        raise


def wait_until(client: Any, name: str, done: Callable[[dict[str, Any]], bool], *, timeout_s: float,
               poll_s: float, what: str, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        endpoint = dict(client.get_endpoint(endpoint=name))
        state = endpoint.get("state") or {}
        if done(state):
            return endpoint
        left = deadline - time.monotonic()
        if left <= 0:
            raise EndpointFailed(f"endpoint {name}: not {what} after {timeout_s:g}s "
                                 f"(ready={state.get('ready')}, config_update={state.get('config_update')})")
        sleep(min(poll_s, left))


def _updating(state: dict[str, Any]) -> bool:
    return state.get("config_update") == "IN_PROGRESS"


def _ready(changed: bool, name: str) -> Callable[[dict[str, Any]], bool]:
    def done(state: dict[str, Any]) -> bool:
        # A failed update we sent is final; an old failure on an endpoint we left alone is not ours.
        if changed and state.get("config_update") in ("UPDATE_FAILED", "UPDATE_CANCELED"):
            raise EndpointFailed(f"endpoint {name}: config update {state['config_update']}; see the "
                                 "endpoint's events in the Serving UI")
        return state.get("ready") == "READY" and not _updating(state)
    return done


def ensure_endpoint(client: Any, spec: dict[str, Any], *, timeout_s: float = 1200.0, poll_s: float = 10.0,
                    dry_run: bool = False, sleep: Callable[[float], None] = time.sleep) -> EndpointChange:
    """Create the endpoint, or update its config if it differs from the spec; wait until it is ready."""
    started = time.monotonic()
    name = spec["name"]
    waits = dict(timeout_s=timeout_s, poll_s=poll_s, sleep=sleep)
    existing = get_or_none(client, name)
    if existing is None:
        outcome = EndpointChange(name, "would_create" if dry_run else "created")
        if not dry_run:
            # route_optimized=None: the client's default (False) would contradict a spec that sets it.
            client.create_endpoint(config=spec, route_optimized=None)
    else:
        if _updating(existing.get("state") or {}) and not dry_run:
            # Databricks refuses a new config while one is rolling out: let it land, then compare.
            existing = wait_until(client, name, lambda s: not _updating(s), what="done updating", **waits)
        diffs = differences(spec["config"], existing.get("config") or {})
        outcome = EndpointChange(name, ("would_update" if dry_run else "updated") if diffs else "unchanged", diffs)
        if diffs and not dry_run:
            client.update_endpoint_config(endpoint=name, config=spec["config"])
        stale = [k for k in ("tags", "ai_gateway", "route_optimized") if k in spec
                 and differences(spec[k], existing.get(k), k)]
        if stale:
            log.warning("endpoint %s: %s differ from the spec; this tool sets them at creation only",
                        name, stale)
    if not dry_run:
        changed = outcome.action != "unchanged"
        ready = wait_until(client, name, _ready(changed, name), what="ready", **waits)
        outcome.state = ready.get("state") or {}
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome
