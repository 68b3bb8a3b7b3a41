"""The two lines a person reads: what a run is about to do, and what it did.

The effective config runs to a hundred lines of JSON (every default, a whole response schema): it
goes to MLflow and the runs table, and to the output only with `--verbose`. At the start one line
names what matters (input, output, endpoint, concurrency, where calls come from).

Example::

    start_line(cfg, "executors", "run.calls_from: auto")
    # input demo.prompts -> output demo.completions; endpoint local-toy (driver_proxy, custom) at
    # 127.0.0.1:7777; C=8; calls from the executors (run.calls_from: auto); --verbose prints the full config
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs.secret_rules import redact_url

if TYPE_CHECKING:
    from jobs.config import EndpointConfig, JobConfig


def where(e: EndpointConfig) -> str:
    """Where the endpoint is, from the config alone (no credentials resolved, no host looked up)."""
    if e.url:
        return redact_url(e.url)
    if e.type == "serving":
        return f"{e.host or '$DATABRICKS_HOST'}/serving-endpoints/{e.name}"
    if e.cluster_id or e.host:
        return f"the driver proxy of cluster {e.cluster_id or '(this one)'}, port {e.port}"
    return f"127.0.0.1:{e.port}"


def input_name(cfg: JobConfig) -> str:
    i = cfg.input
    return i.table or i.path or "input.query"


def start_line(cfg: JobConfig, mode: str, why: str) -> str:
    """input -> output; endpoint; concurrency; calling mode: one line instead of the whole config."""
    e = cfg.endpoint
    dry = "dry run (one probe request, nothing written): " if cfg.run.dry_run else ""
    limit = f" (at most {cfg.run.limit} rows)" if cfg.run.limit else ""
    return (f"{dry}input {input_name(cfg)}{limit} -> output {cfg.output.table}; endpoint {e.name} ({e.type}, "
            f"{e.task}) at {where(e)}; C={cfg.limits.max_concurrency}; calls from the {mode} ({why}); "
            "--verbose prints the full config")


__all__ = ["start_line", "where"]
