"""What a task needs to call the endpoint: `EngineSpec`, with its retry policy's numbers in `RetrySpec`.

Plain, picklable data: built once on the driver (`jobs.endpoint.resolve`), shipped to every task, and its repr
shows no secret (credentials travel inside `udfs.auth.Secret`).

Example::

    spec = EngineSpec(url="http://127.0.0.1:7777/", task="custom", endpoint_type="driver_proxy")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from udfs.auth import Credentials, Secret
from udfs.budget import BudgetSpec


@dataclass(frozen=True)
class RetrySpec:
    statuses: tuple[int, ...] = (429, 500, 502, 503, 504)
    max_attempts: int = 6
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    # Per row, across attempts and waits: what bounds the retries of 429 and 503, which the task's
    # governor holds back until the endpoint answers again (`max_attempts` bounds the others).
    row_budget_s: float = 600.0
    # The breaker: nothing answered for this long and the rest of the task's rows fail fast as
    # `endpoint_unavailable`. Longer than a five-minute cold start; shorter than the row budget.
    breaker_s: float = 480.0
    # A pause of 429s alone (an hourly query limit) may last this long: the breaker waits for it and the
    # rows' budgets do not run meanwhile; past it the breaker opens.
    max_pause_s: float = 3600.0
    # Structured output: times an answer that breaks the response schema is asked for again.
    invalid_output_attempts: int = 1


@dataclass(frozen=True)
class EngineSpec:
    """Everything a task needs to call the endpoint; picklable, and its repr shows no secret."""

    url: str
    # The endpoint's name, written in the `endpoint` column of the rows it answers.
    name: str = ""
    # Its role among the run's endpoints (`primary`, `overflow`, `fallback`; `udfs.router`).
    role: str = "primary"
    task: str = "custom"
    endpoint_type: str = "serving"
    headers: dict[str, Secret | str] = field(default_factory=dict)
    # The Authorization header when it can change during the run (OAuth): `udfs.auth.Credentials`.
    credentials: Credentials | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    system_prompt: str | None = None
    transform_input: str | None = None
    transform_output: str | None = None
    rows_per_request: int = 1
    max_concurrency: int = 8
    requests_per_s: float | None = None
    tokens_per_s: float | None = None
    # Input and output tokens limited separately (Foundation Model APIs' pay-per-token limits).
    input_tokens_per_s: float | None = None
    output_tokens_per_s: float | None = None
    # Where the governor's learned rate starts (requests/s), below a limit the endpoint declares
    # (its AI Gateway rate limits); None: unpaced until the first 429.
    start_requests_per_s: float | None = None
    # The run's breaker was open in an earlier chunk (why): tasks probe once before sending.
    endpoint_down: str | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0
    adaptive: bool = True
    latency_cut_factor: float = 1.5
    http_client: str = "aiohttp"
    retry: RetrySpec = field(default_factory=RetrySpec)
    # Structured output (`udfs.structured`): the JSON Schema every answer must match, the name and
    # strictness sent with it, and where in the body it goes (None: the protocol's own place).
    response_schema: dict[str, Any] | None = None
    response_format_name: str = "response"
    response_format_strict: bool = True
    response_format_at: str | None = None
    # `run.budget`: this task's share of what the run may still spend (None: no cap).
    budget: BudgetSpec | None = None
    # Executors mode: the run's key for pooling the in-flight shares of the tasks on one host
    # (`udfs.hostpool`); None: each task keeps its own share.
    pool_key: str | None = None

    def secrets(self) -> list[Secret]:
        held = [v for v in self.headers.values() if isinstance(v, Secret)]
        return held + (self.credentials.secrets() if self.credentials is not None else [])
