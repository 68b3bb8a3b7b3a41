"""The job's configuration: YAML in `conf/`, parsed once into typed objects and validated before Spark.

Every error names the key that is wrong (`endpoint.model_kwargs.api_key: ...`). Secrets never live in
config: a key that looks like a credential, or a value that looks like a token, is refused; tokens come
from the environment (`endpoint.token_env`), a Databricks secret scope (`endpoint.token_secret`) or
databricks-sdk's unified auth (`endpoint.auth: databricks`).

Example::

    cfg = load_config("conf/demo.yml", overrides=["limits.max_concurrency=16"])
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
import string
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from jobs import secret_rules
from udfs.budget import DEFAULT_RESERVE_OUTPUT_TOKENS
from udfs.protocols import is_embeddings_task, make_protocol
from udfs.spec import EngineSpec, RetrySpec
from udfs.structured import UnsupportedSchema, check_schema, wire_format

TASKS = ("custom", "llm/v1/completions", "llm/v1/chat", "llm/v1/embeddings", "custom/embeddings")
Task = Literal["custom", "llm/v1/completions", "llm/v1/chat", "llm/v1/embeddings", "custom/embeddings"]

class ConfigError(ValueError):
    """A bad configuration: the message names the key and says what is expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Strict):
    # The secret scope.
    scope: str
    # The secret's key in the scope.
    key: str


# Columns of the output table and the job's own working columns: a kept input column may not take
# one of these names (tests/test_structured.py checks the list against the output schemas).
RESERVED_COLUMNS = frozenset({
    "id", "prompt", "text", "response", "parsed", "embedding", "dim", "status", "error", "http_status",
    "attempts", "sent_at", "latency_ms", "prompt_tokens", "completion_tokens", "request_hash", "endpoint",
    "run_id", "completed_at", "precheck"})


def template_parts(template: str) -> list[tuple[str, str | None]]:
    """`"Review of {product}: {body}"` -> `[("Review of ", "product"), (": ", "body")]`: literal text,
    then the column that follows it (None at the end). `{{` and `}}` are literal braces, as in
    Python's `str.format`; a field is a column name, with no format spec or conversion."""
    parts: list[tuple[str, str | None]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"input.template: {exc} (write a literal brace as {{{{ or }}}})") from None
    for literal, field, spec, conversion in parsed:
        if field is not None and not field.strip():
            raise ValueError("input.template: an empty {} names no column; write {column_name}")
        if spec or conversion:
            shown = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"input.template: {{{shown}}}: a field is a column name, without a format "
                             "spec or conversion")
        parts.append((literal, field))
    return parts


class InputConfig(_Strict):
    # The input table (catalog.schema.table); give exactly one of table, path or query.
    table: str | None = None
    # A Delta table by path instead of by name.
    path: str | None = None
    # A SQL query whose rows are the input (shape or rename columns here).
    query: str | None = None
    # The column that identifies a row: unique, never null; resume keys on it.
    id_col: str = "id"
    # The column sent as the prompt (or the text to embed).
    prompt_col: str = "prompt"
    # The prompt built from several columns: `"Classify this review of {product}: {body}"`.
    template: str | None = None
    # A null column in the template: `error` (the row is `null_field`, never sent) or `empty` ("").
    null_fields: Literal["error", "empty"] = "error"
    # Input columns landed as they are beside the outcome, so analysts need no join back.
    keep_columns: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> InputConfig:
        given = [k for k in ("table", "path", "query") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of table, path or query (got {given or 'none'})")
        return self

    @model_validator(mode="after")
    def _prompt_source(self) -> InputConfig:
        if self.template is not None:
            if "prompt_col" in self.model_fields_set:
                raise ValueError("input.template and input.prompt_col: give one; the template names its "
                                 "columns")
            if not self.template_fields:
                raise ValueError("input.template names no column ({column}); use input.prompt_col for "
                                 "one column as it is")
        elif "null_fields" in self.model_fields_set:
            raise ValueError("input.null_fields applies to input.template only")
        return self

    @model_validator(mode="after")
    def _kept(self) -> InputConfig:
        for name in self.keep_columns:
            if name in RESERVED_COLUMNS or name.startswith("_"):
                raise ValueError(f"input.keep_columns: {name!r} is a column the job writes itself; rename it "
                                 f"in input.query (SELECT {name} AS input_{name}, ...)")
        repeated = sorted({n for n in self.keep_columns if self.keep_columns.count(n) > 1})
        if repeated:
            raise ValueError(f"input.keep_columns: {repeated} given more than once")
        return self

    @property
    def template_fields(self) -> list[str]:
        """The columns the template names, each once, in order of first use."""
        if self.template is None:
            return []
        return list(dict.fromkeys(f for _, f in template_parts(self.template) if f is not None))


class OutputConfig(_Strict):
    # The Delta table the outcomes land in, one row per input id; created if missing.
    table: str
    # One row per run (counts, latency, tokens, cost): `jobs.observe`. Unset: no runs table.
    runs_table: str | None = None

    @field_validator("table", "runs_table")
    @classmethod
    def _table_name(cls, v: str | None) -> str | None:
        if v is not None and (not re.fullmatch(r"[A-Za-z0-9_`.-]+", v) or v.count(".") > 2):
            raise ValueError(f"{v!r} is not a table name (catalog.schema.table, schema.table or table)")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> OutputConfig:
        if self.runs_table is not None and self.runs_table == self.table:
            raise ValueError("runs_table must be another table than table")
        return self


class ResponseFormatConfig(_Strict):
    """`endpoint.response_format`: the JSON Schema answers must match, landed as the `parsed` column.

    Written as the schema itself, as a path to a `.json` file (next to the config), or in full as
    `{schema, name, strict, send_at}`; `jobs.config.parse_config` reads a file before validation.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    # The JSON Schema every answer must match; it also gives the `parsed` column its type. (`schema`
    # is a name pydantic's BaseModel already uses: the field is json_schema, spelt schema.)
    json_schema: dict[str, Any] = Field(alias="schema")
    # The json_schema's name: letters, digits, _ and -, 64 at most (OpenAI's rule, which Databricks passes on).
    name: str = Field(default="response", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # Ask the endpoint to follow the schema strictly (OpenAI's `strict`).
    strict: bool = True
    # Where in the request body a custom model or driver-proxy app takes it (`params.response_format`);
    # unset, they are sent nothing. Chat and completions always take it as `response_format`.
    send_at: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*$")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        # The schema alone (no `schema` key: JSON Schema has no such keyword) stands for {schema: it}.
        if isinstance(data, dict) and "schema" not in data and "json_schema" not in data:
            return {"schema": data}
        return data

    @field_validator("json_schema")
    @classmethod
    def _landable(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            check_schema(v)
        except UnsupportedSchema as exc:
            raise ValueError(str(exc)) from None
        return v

    def wire(self) -> dict[str, Any]:
        return wire_format(self.json_schema, self.name, self.strict)


class EndpointConfig(_Strict):
    # The serving endpoint's name (or a name for a driver-proxy app, written in each row).
    name: str
    # `serving` (Databricks model serving) or `driver_proxy` (an app on a cluster's driver).
    type: Literal["serving", "driver_proxy"] = "serving"
    # The wire format: custom, llm/v1/completions, llm/v1/chat, llm/v1/embeddings, custom/embeddings.
    task: Task = "custom"
    # Workspace URL for serving endpoints and the driver proxy; default: databricks-sdk's Config().host.
    host: str | None = None
    # Full base URL, overriding what host/name/port would give (a local app, a gateway).
    url: str | None = None
    # A driver-proxy app's port (3000-8000); locally, http://127.0.0.1:<port>/.
    port: int | None = Field(default=None, ge=3000, le=8000)
    # The cluster a driver-proxy app runs on; default: this cluster's id from the Spark conf.
    cluster_id: str | None = None
    # `auto`: none for 127.0.0.1, else databricks-sdk's unified auth; `none`; `databricks`.
    auth: Literal["auto", "none", "databricks"] = "auto"
    # The environment variable holding a bearer token (never the token itself).
    token_env: str | None = None
    # A Databricks secret scope and key holding a bearer token: {scope, key}.
    token_secret: SecretRef | None = None
    # Sent with every request: temperature, max_tokens, ... (custom models: as `params`).
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    # Stop sequences sent with every request.
    stop: list[str] = Field(default_factory=list)
    # llm/v1/chat only: the system message sent before each prompt.
    system_prompt: str | None = None
    # `module:function` that rewrites each request body (dict -> dict), on the executors.
    transform_input: str | None = None
    # `module:function` that turns each decoded answer into the response text.
    transform_output: str | None = None
    # Rows per request: custom models take several `dataframe_records`, embeddings several inputs.
    batch_size: int | None = Field(default=None, ge=1, le=2048)
    # Embeddings: the vector length every `ok` row must have; unset, the run's first vectors set it.
    embedding_dim: int | None = Field(default=None, ge=1, le=65536)
    # The price of 1,000 prompt tokens, in endpoint.price_unit, for the cost estimates (the closing line,
    # runs table, MLflow, dry run); with neither price set: no estimate.
    price_per_1k_prompt_tokens: float | None = Field(default=None, ge=0)
    # The price of 1,000 completion tokens, in endpoint.price_unit.
    price_per_1k_completion_tokens: float | None = Field(default=None, ge=0)
    # What the prices are in, printed with every cost: a currency (USD, EUR) or DBU.
    price_unit: str = Field(default="USD", pattern=r"^[A-Za-z$€£¥]{1,8}$")
    # Structured output: the answers' JSON Schema, sent with the request and checked on the answer.
    response_format: ResponseFormatConfig | None = None
    # Read the serving endpoint's definition from the workspace (AI Gateway rate limits, route
    # optimization, state) before the run: unset, for serving endpoints reached through the workspace
    # (no `url`); false never; true also fails the run if it cannot be read.
    read_definition: bool | None = None

    @field_validator("transform_input", "transform_output")
    @classmethod
    def _module_function(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(f"{v!r} must name a function as module:function")
        return v

    @model_validator(mode="after")
    def _one_credential(self) -> EndpointConfig:
        """A token source and an `auth` mode that says otherwise: refuse, rather than guess which wins."""
        sources = [k for k in ("token_env", "token_secret") if getattr(self, k)]
        if len(sources) > 1:
            raise ValueError("endpoint.token_env and endpoint.token_secret: give at most one, not both")
        if sources and self.auth != "auto":
            raise ValueError(f"endpoint.auth: {self.auth} contradicts endpoint.{sources[0]}: the token would be "
                             f"{'sent anyway' if self.auth == 'none' else 'used instead of databricks-sdk auth'}; "
                             f"remove endpoint.{sources[0]}, or leave endpoint.auth unset (auto)")
        return self

    @model_validator(mode="after")
    def _coherent(self) -> EndpointConfig:
        if self.type == "driver_proxy":
            if self.port is None and self.url is None:
                raise ValueError("a driver_proxy endpoint needs `port` (3000-8000) or `url`")
            if self.task in ("llm/v1/completions", "llm/v1/chat", "custom/embeddings"):
                raise ValueError("driver_proxy apps take {prompt, stop}: use task custom or llm/v1/embeddings")
        if self.system_prompt is not None and self.task != "llm/v1/chat":
            raise ValueError("system_prompt applies to task llm/v1/chat only")
        if self.batch_size and self.batch_size > 1 and self.task in ("llm/v1/completions", "llm/v1/chat"):
            raise ValueError(f"task {self.task} answers one prompt per request: batch_size must be 1")
        if self.batch_size and self.batch_size > 1 and self.type == "driver_proxy":
            raise ValueError("driver_proxy apps answer one prompt per request: batch_size must be 1")
        if self.embedding_dim is not None and not self.is_embeddings:
            raise ValueError(f"embedding_dim applies to embeddings tasks only, not {self.task}")
        return self

    @model_validator(mode="after")
    def _structured(self) -> EndpointConfig:
        rf = self.response_format
        if rf is None:
            return self
        if self.is_embeddings:
            raise ValueError(f"endpoint.response_format: task {self.task} answers vectors, not text to parse")
        if "response_format" in self.model_kwargs:
            raise ValueError("endpoint.model_kwargs.response_format and endpoint.response_format: give only "
                             "endpoint.response_format (it is sent, and answers are checked against it)")
        if rf.send_at is not None and self.task in ("llm/v1/chat", "llm/v1/completions"):
            raise ValueError(f"endpoint.response_format.send_at: task {self.task} takes response_format at "
                             "the top of the body; send_at is for custom models and driver-proxy apps")
        try:  # the body a request will have: a send_at that collides with it fails here, not per row
            make_protocol(self.task, self.type, model_kwargs=self.model_kwargs, stop=self.stop,
                          response_format=rf.wire(), response_format_at=rf.send_at).build(["probe"])
        except ValueError as exc:
            raise ValueError(f"endpoint.response_format.send_at: {exc}") from None
        return self

    @property
    def rows_per_request(self) -> int:
        if self.batch_size:
            return self.batch_size
        # 32 texts per request unless told: Databricks' own LangChain wrapper sends a fixed 20.
        return 32 if self.is_embeddings and self.type == "serving" else 1

    @property
    def is_embeddings(self) -> bool:
        return is_embeddings_task(self.task)


# The engine's defaults are written once, in `udfs.spec` (`EngineSpec`, `RetrySpec`); the config's fields
# read them there, so a default changed in one place is changed for both.
_RETRY = RetrySpec()


class LimitsConfig(_Strict):
    # The most requests in flight against the endpoint for the whole job, summed over all tasks.
    max_concurrency: int = Field(default=EngineSpec.max_concurrency, ge=1, le=4096)
    # Job-wide pacing of requests, split over the tasks; unset: the endpoint's AI Gateway limit, if any.
    requests_per_minute: float | None = Field(default=None, gt=0)
    # Job-wide pacing of tokens (prompt + completion), from the usage the endpoint reports.
    tokens_per_minute: float | None = Field(default=None, gt=0)
    # Foundation Model APIs' pay-per-token limits count input and output tokens separately: each its
    # own budget (README "Speed and limits"), alongside tokens_per_minute if that is set too.
    input_tokens_per_minute: float | None = Field(default=None, gt=0)
    # The output tokens' own budget per minute (see input_tokens_per_minute).
    output_tokens_per_minute: float | None = Field(default=None, gt=0)
    # Per attempt: the most seconds connecting may take (TCP, proxy tunnel, TLS).
    connect_timeout_s: float = Field(default=EngineSpec.connect_timeout_s, gt=0)
    # Per attempt: the most seconds the answer may fall silent.
    read_timeout_s: float = Field(default=EngineSpec.read_timeout_s, gt=0)
    # AIMD on requests in flight: a 429/503 or a latency per unit of work that grows cuts it, answers add back.
    adaptive: bool = EngineSpec.adaptive
    # Cut the in-flight limit by a quarter when the latency per unit of work (per output token, per
    # embedded row) exceeds this multiple of the recent median, three windows in a row (udfs/limits.py).
    latency_cut_factor: float = Field(default=EngineSpec.latency_cut_factor, gt=1)
    # Executors mode: the tasks on one host lend each other the in-flight share they do not use (a
    # task waiting for its slowest answers), through file locks in the host's temp dir (udfs/hostpool.py);
    # the job-wide limit holds either way. One setting for the run: with several endpoints, the primary's.
    host_pool: bool = True
    # The engine's HTTP client (udfs/transport.py). `asyncio`, the name of a client of our own that
    # aiohttp replaced (benchmarks/README.md), still parses so that existing configs keep working.
    http_client: Literal["aiohttp", "urllib3", "requests", "asyncio"] = "aiohttp"

    @field_validator("http_client")
    @classmethod
    def _deprecated_client(cls, v: str) -> str:
        if v == "asyncio":
            logging.getLogger("batch_inference").warning(
                "limits.http_client: asyncio is deprecated and now means aiohttp; set limits.http_client: aiohttp")
            return "aiohttp"
        return v


ROLES = ("primary", "overflow", "fallback")


class RoutedEndpoint(EndpointConfig):
    """One entry of `endpoints:`: a whole endpoint config (every `endpoint.*` key), with its role and
    its own limits."""
    # `primary` gets the rows first; `overflow` takes the excess while the primaries are saturated
    # (their in-flight limit full, or pausing on 429/503); `fallback` takes a row that failed on the
    # others for the endpoint's sake (endpoint_unavailable, retries exhausted), never one refused for
    # its content (400, invalid_output). With `split`, every split endpoint is a primary.
    role: Literal["primary", "overflow", "fallback"] = "primary"
    # This endpoint's own limits (its in-flight limit holds job-wide); unset: the top-level `limits`.
    limits: LimitsConfig | None = None


class RetryConfig(_Strict):
    # HTTP statuses retried (timeouts and connection errors are retried too).
    statuses: list[int] = Field(default_factory=lambda: list(_RETRY.statuses))
    # Attempts per row for retryable failures other than 429, 503 and no connection.
    max_attempts: int = Field(default=_RETRY.max_attempts, ge=1, le=100)
    # The first backoff; it doubles per attempt, with full jitter.
    backoff_base_s: float = Field(default=_RETRY.backoff_base_s, ge=0)
    # The longest backoff (a Retry-After is waited for in full).
    backoff_max_s: float = Field(default=_RETRY.backoff_max_s, ge=0)
    # Total time one row may spend across attempts and waits before it becomes an error row; what
    # bounds the retries of 429 and 503 (a one-minute window, a five-minute cold start).
    row_budget_s: float = Field(default=_RETRY.row_budget_s, gt=0)
    # The breaker: when nothing has answered for this long, the rest of the chunk fails fast as
    # `endpoint_unavailable`, and later chunks probe once before sending.
    breaker_s: float = Field(default=_RETRY.breaker_s, gt=0)
    # A rate limit that answers 429 for long (Foundation Model APIs' queries per hour: up to an hour)
    # pauses the job instead of failing rows: neither breaker_s nor row_budget_s run while every
    # failure is a 429, for up to this long; the log says "paused: rate limit, resuming at HH:MM".
    max_pause_s: float = Field(default=_RETRY.max_pause_s, gt=0)
    # Structured output: times an answer that breaks `endpoint.response_format` is asked for again.
    invalid_output_attempts: int = Field(default=_RETRY.invalid_output_attempts, ge=0, le=10)


class BudgetConfig(_Strict):
    """`run.budget`: the most one run may spend; any of the four (unset: no cap on that). When it is
    spent the run sends nothing more, commits what was answered, leaves the rest pending and exits 3."""
    # The most the run may cost, in `endpoint.price_unit` at `endpoint.price_per_1k_*_tokens` (both set).
    max_cost: float | None = Field(default=None, gt=0)
    # The most input (prompt) tokens the run may send, as the endpoint's `usage` counts them.
    max_input_tokens: int | None = Field(default=None, ge=1)
    # The most output (completion) tokens the run may be answered with.
    max_output_tokens: int | None = Field(default=None, ge=1)
    # The most requests (attempts) the run may send.
    max_requests: int | None = Field(default=None, ge=1)
    # Output tokens a request reserves while in flight when `endpoint.model_kwargs.max_tokens` is unset.
    reserve_output_tokens: int = Field(default=DEFAULT_RESERVE_OUTPUT_TOKENS, ge=1)

    @property
    def caps(self) -> dict[str, float]:
        return {k: v for k, v in (("max_cost", self.max_cost), ("max_input_tokens", self.max_input_tokens),
                                  ("max_output_tokens", self.max_output_tokens),
                                  ("max_requests", self.max_requests)) if v is not None}


class RunConfig(_Strict):
    # Where the endpoint is called from: `executors` (the pandas UDF, classic clusters), `driver` (the
    # job's own process: serverless and Spark Connect, whose UDFs cannot reach the internet), or
    # `auto`: driver on Spark Connect, executors on classic Spark.
    calls_from: Literal["auto", "executors", "driver"] = "auto"
    # Rows per chunk; unset, chunks follow the work: a small first chunk, then `chunk_seconds` of
    # calls at the measured rate each, at most `max_chunk_rows` (what a crash can lose is bounded).
    chunk_rows: int | None = Field(default=None, ge=1)
    # Seconds of calls per chunk when chunks are sized by the measured rate.
    chunk_seconds: float = Field(default=30.0, gt=0)
    # The most rows in a chunk (what a crash can lose is bounded).
    max_chunk_rows: int = Field(default=100_000, ge=1)
    # Any failed row fails the run (exit 1), after every row is written.
    fail_on_error: bool = False
    # The run fails (exit 1, after every row is written) when more than this share of the rows it sent
    # failed: an endpoint down for the whole run must not show green. 1 never fails on errors.
    max_error_share: float = Field(default=0.5, ge=0, le=1)
    # A rerun sends the rows that failed before again; false: only new rows.
    retry_errors: bool = True
    # A longer prompt is never sent: the row is `prompt_too_long`.
    max_prompt_chars: int = Field(default=200_000, ge=1)
    # At most this many pending rows per run, lowest ids first (`--limit`).
    limit: int | None = Field(default=None, ge=1)
    # Which pending rows `run.limit` takes: the lowest ids (consecutive runs walk the table), or
    # `spread` over the table by a hash of the request (a sample, as the dry run's forecast takes).
    limit_order: Literal["id", "spread"] = "id"
    # Task slots running at once (cores that run tasks); discovered from the session when unset.
    task_slots: int | None = Field(default=None, ge=1)
    # Check config, input and endpoint (one probe request), estimate cost; write nothing (`--dry-run`).
    dry_run: bool = False
    # --dry-run sends this many pending rows for real (their outcomes are committed, so no row is paid
    # for twice) and extrapolates tokens, cost and time to the rest; 0: a dry run writes nothing.
    forecast_rows: int = Field(default=20, ge=0)
    # The most one run may spend (cost, input/output tokens, requests); spent, the run stops (exit 3).
    budget: BudgetConfig = Field(default_factory=BudgetConfig)

    # A dry run prices every input row (`--dry-run --all`), as a full re-run would send them, not only
    # the pending ones: after a finished run the pending rows price at 0.
    dry_run_all: bool = False

    @model_validator(mode="after")
    def _all_is_for_dry_runs(self) -> RunConfig:
        if self.dry_run_all and not self.dry_run:
            raise ValueError("run.dry_run_all (--all) applies to a dry run: add --dry-run")
        return self


class MlflowConfig(_Strict):
    """MLflow tracking of each run (params, summary metrics, plots). Off unless `enabled`."""

    # Record each run in MLflow: params, metrics, plots.
    enabled: bool = False
    # Where runs are recorded. Default: $MLFLOW_TRACKING_URI, else the workspace on Databricks, else
    # `sqlite:///<working dir>/mlruns/mlflow.db` (artifacts in mlruns/artifacts).
    tracking_uri: str | None = None
    # The experiment. Default: `batch-inference` locally, `/Users/<you>/batch-inference` on Databricks.
    experiment: str | None = None


class JobConfig(_Strict):
    # Where the prompts come from: a table, a Delta path or a query, and which columns (see below).
    input: InputConfig
    # Where the outcomes land: the Delta table, and the runs table (see below).
    output: OutputConfig
    # One endpoint; or give `endpoints` instead (then this is their primary, set from them).
    endpoint: EndpointConfig = None  # type: ignore[assignment]  # set from `endpoints` when absent
    # Several endpoints in one run, each a full endpoint config with a `role` and its own `limits`
    # (README "Several endpoints"): overflow from provisioned throughput to pay-per-token, fallback
    # on failure, or a `split` to compare two models. Give `endpoint` or `endpoints`, not both.
    endpoints: list[RoutedEndpoint] | None = None
    # Send each row to one endpoint, chosen from a hash of its id, by weight (`{a: 0.5, b: 0.5}`):
    # two models compared on the same rows. Names are `endpoints[].name`; weights are normalised.
    split: dict[str, float] | None = None
    # The in-flight limit and request/token rates (see below); with `endpoints`, the default of each.
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    # Retries, backoff, the breaker, and rate-limit pauses (see below).
    retry: RetryConfig = Field(default_factory=RetryConfig)
    # Chunks, calling mode, limits on rows and errors, dry runs, budgets (see below).
    run: RunConfig = Field(default_factory=RunConfig)
    # MLflow tracking of each run (see below).
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    _given_limits: LimitsConfig | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _routes(self) -> JobConfig:
        """`endpoint` or `endpoints` (then `endpoint` is their primary, and `limits` its limits)."""
        if self.endpoints is None:
            if self.endpoint is None:
                raise ValueError("endpoint: missing required field (or give `endpoints`, a list)")
            if self.split is not None:
                raise ValueError("split: needs `endpoints` (a list of the endpoints to split between)")
            return self
        if self.endpoint is not None:
            raise ValueError("endpoints: give `endpoint` (one) or `endpoints` (a list), not both")
        check_routes(self.endpoints, self.split)
        primary = next(e for e in self.endpoints if e.role == "primary")
        self._given_limits = self.limits
        object.__setattr__(self, "endpoint", primary)  # frozen: set once, here, before any use
        object.__setattr__(self, "limits", primary.limits or self.limits)
        return self

    @model_validator(mode="after")
    def _budget_prices(self) -> JobConfig:
        for key, e in self.keyed_endpoints():
            if self.run.budget.max_cost is not None and (e.price_per_1k_prompt_tokens is None
                                                         or e.price_per_1k_completion_tokens is None):
                raise ValueError(f"run.budget.max_cost needs {key}.price_per_1k_prompt_tokens and "
                                 f"{key}.price_per_1k_completion_tokens (cost is counted from tokens)")
        return self

    def keyed_endpoints(self) -> list[tuple[str, EndpointConfig]]:
        """Every endpoint of the run with the key its settings live under (`endpoints.1`, `endpoint`)."""
        if self.endpoints is None:
            return [("endpoint", self.endpoint)]
        return [(f"endpoints.{i}", e) for i, e in enumerate(self.endpoints)]

    def routes(self) -> list[Route]:
        """The run's endpoints in config order, each with its role, its limits and its split weight
        (one `primary` route for a config with a single `endpoint`)."""
        if self.endpoints is None:
            return [Route(self.endpoint, "primary", self.limits, None)]
        weights = normalised(self.split) if self.split else {}
        return [Route(e, e.role, e.limits or self._top_limits(), weights.get(e.name)) for e in self.endpoints]

    def _top_limits(self) -> LimitsConfig:
        """The top-level `limits` as written: the default of every endpoint without its own."""
        return self._given_limits or self.limits

    def config_hash(self) -> str:
        """A digest of the whole effective config, so runs made with the same settings group together."""
        dumped = self.model_dump(mode="json")
        for key in ("endpoints", "split"):  # unset: configs of one endpoint keep their hash
            if dumped.get(key) is None:
                dumped.pop(key, None)
        blob = json.dumps(dumped, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def request_fingerprint(self) -> str:
        """A digest of everything that shapes a request except the prompt (resume keys on it).

        With several endpoints, one digest of all their request-shaping settings (and the split), so
        that a row's `request_hash` is the same whichever endpoint answers it: a change to any
        endpoint's name, task, parameters, stop, system prompt, transforms or response format (or to
        the split) makes every row pending again; limits, prices and roles change nothing.
        """
        if self.endpoints is None or len(self.endpoints) == 1:
            blob = json.dumps(_shaping(self.endpoint), sort_keys=True, separators=(",", ":"), default=str)
        else:
            every = sorted((_shaping(e) for e in self.endpoints), key=lambda d: d["endpoint"])
            blob = json.dumps({"endpoints": every, "split": normalised(self.split) if self.split else None},
                              sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def redacted(self) -> dict[str, Any]:
        """The effective config for printing: every URL's password and query values masked
        (`secret_rules.redact`). Secrets themselves are never in a config, only references to them,
        which are shown as they are."""
        return secret_rules.redact(self.model_dump(mode="json"))


class Route(NamedTuple):
    """One endpoint of a run as the engine takes it: its config, role, limits and split weight."""
    endpoint: EndpointConfig
    role: str
    limits: LimitsConfig
    weight: float | None


def _shaping(e: EndpointConfig) -> dict[str, Any]:
    """What of an endpoint's config shapes its requests (`JobConfig.request_fingerprint`)."""
    shaping = {
        "endpoint": e.name, "type": e.type, "task": e.task, "model_kwargs": e.model_kwargs,
        "stop": e.stop, "system_prompt": e.system_prompt,
        "transform_input": e.transform_input, "transform_output": e.transform_output,
    }
    if e.response_format is not None:
        # Only when set: configs without one keep the hashes their tables already hold.
        shaping["response_format"] = e.response_format.model_dump(mode="json")
    return shaping


def normalised(split: dict[str, float]) -> dict[str, float]:
    total = sum(split.values())
    return {k: v / total for k, v in split.items()}


def check_routes(endpoints: list[RoutedEndpoint], split: dict[str, float] | None) -> None:
    """The rules of `endpoints` and `split`, each error naming its key."""
    if not endpoints:
        raise ValueError("endpoints: an empty list; give at least one endpoint")
    names: dict[str, int] = {}
    for i, e in enumerate(endpoints):
        if e.name in names:
            raise ValueError(f"endpoints.{i}.name: {e.name!r} is also endpoints.{names[e.name]}.name; "
                             "each endpoint needs a name of its own (rows record which one answered)")
        names[e.name] = i
        if e.is_embeddings != endpoints[0].is_embeddings:
            raise ValueError(f"endpoints.{i}.task: {e.task} and endpoints.0.task {endpoints[0].task}: one run "
                             "lands vectors or text, not both")
        rf, rf0 = e.response_format, endpoints[0].response_format
        if (rf and rf.model_dump()) != (rf0 and rf0.model_dump()):
            raise ValueError(f"endpoints.{i}.response_format: differs from endpoints.0.response_format; the rows "
                             "land in one `parsed` column, so every endpoint needs the same one")
    if split is None:
        primaries = [i for i, e in enumerate(endpoints) if e.role == "primary"]
        if len(primaries) != 1:
            raise ValueError(f"endpoints: {len(primaries)} have role primary ({', '.join(f'endpoints.{i}' for i in primaries) or 'none'}); "
                             "give exactly one (the others overflow or fallback), or a `split` between them")
        return
    for name, w in split.items():
        if name not in names:
            close = difflib.get_close_matches(name, list(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (names: {', '.join(names)})"
            raise ValueError(f"split.{name}: no endpoint of that name{hint}")
        if not w > 0:
            raise ValueError(f"split.{name}: {w} must be above 0 (leave the endpoint out instead)")
    for i, e in enumerate(endpoints):
        if e.name in split and e.role != "primary":
            raise ValueError(f"endpoints.{i}.role: {e.role}, but split sends it rows; a split endpoint is a primary")
        if e.name not in split and e.role != "fallback":
            raise ValueError(f"endpoints.{i}.role: {e.role}, but it is not in split; with a split the other "
                             "endpoints can only be fallbacks")


_ADVICE = {
    secret_rules.LITERAL_CREDENTIAL: "a literal credential is not allowed in config; use endpoint.token_env (an "
                                     "environment variable), endpoint.token_secret (a Databricks secret scope) "
                                     "or endpoint.auth: databricks",
    secret_rules.PLAINTEXT_FIELD: "a plaintext credential is not allowed in config; use endpoint.token_env or "
                                  "endpoint.token_secret",
    secret_rules.TOKEN_SHAPED: "this value looks like a token; secrets never go in config files",
    secret_rules.URL_CREDENTIAL: "this URL carries a credential ({detail}); secrets never go in config files: "
                                 "use endpoint.token_env or endpoint.token_secret",
}


def check_no_secrets(data: Any) -> None:
    """The first secret in a config document, as a `ConfigError` naming its key (never its value).

    A response schema's keys are the names of fields to extract (a `token` property is no credential),
    so there only its values (descriptions, enums, defaults) are looked at.
    """
    endpoint = data.get("endpoint") if isinstance(data, dict) else None
    schema = endpoint.get("response_format") if isinstance(endpoint, dict) else None
    if schema is not None:
        data = {**data, "endpoint": {k: v for k, v in endpoint.items() if k != "response_format"}}
    findings = list(secret_rules.find_secrets(data))
    findings += [f for path, value in _leaves(schema, "endpoint.response_format")
                 for f in secret_rules.find_secrets(value, path)]
    for finding in findings:
        raise ConfigError(f"{finding.path}: {_ADVICE[finding.kind].format(detail=finding.detail)}")


def _leaves(node: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, node)]


def resolve_schema_files(data: dict[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """`endpoint.response_format` given as a path (or `{schema: path}`): the file's JSON in its place.

    A relative path is looked for next to the config file first, then in the working directory.
    """
    endpoint = data.get("endpoint")
    rf = endpoint.get("response_format") if isinstance(endpoint, dict) else None
    if isinstance(rf, str):
        key, ref, rf = "endpoint.response_format", rf, {"schema": rf}
    elif isinstance(rf, dict) and isinstance(rf.get("schema"), str):
        key, ref = "endpoint.response_format.schema", rf["schema"]
    else:
        return data
    tried = [Path(ref)] if Path(ref).is_absolute() else [*([base_dir / ref] if base_dir else []), Path.cwd() / ref]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise ConfigError(f"{key}: no such file {ref} (looked in {', '.join(str(p.parent) for p in tried)})")
    try:
        schema = json.loads(found.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: {found} is not valid JSON: {exc}") from None
    return {**data, "endpoint": {**endpoint, "response_format": {**rf, "schema": schema}}}


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["limits.max_concurrency=16", "run.dry_run=true"]` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. limits.max_concurrency=16")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value is not valid YAML ({exc.__class__.__name__})") from None
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that holds the key at `loc` (`("limits", "max_concurency")` -> `LimitsConfig`)."""
    model: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        if isinstance(part, int):  # an entry of a list (`endpoints.1.rol`): the entry's model
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        kinds = [a for a in _nested(field.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not kinds:
            return None
        model = kinds[0]
    return model


def _nested(annotation: Any) -> list[Any]:
    """`list[RoutedEndpoint] | None` -> [that, list[...], RoutedEndpoint, None]: every type inside."""
    out = [annotation]
    for a in get_args(annotation):
        out += _nested(a)
    return out


def _unknown_key(loc: tuple[Any, ...]) -> str:
    """`unknown key; did you mean limits.max_concurrency?`, when a known key is close enough."""
    model = _section_model(loc)
    if model is None or not loc:
        return "unknown key"
    known = [f.alias or name for name, f in model.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    if not close:
        return "unknown key"
    return f"unknown key; did you mean {'.'.join(str(p) for p in (*loc[:-1], close[0]))}?"


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = _unknown_key(e["loc"]) if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] == "missing":
            msg = "missing required field"
        if e["type"] == "value_error":
            msg = str(e.get("ctx", {}).get("error", msg))
        # A validator that names its keys in full (`endpoint.auth: ...`) needs no prefix.
        top = where == "(top level)" and re.match(r"[a-z_]+[.:]", msg)  # names its own keys
        lines.append(msg if msg.startswith(f"{where}.") or top else f"{where}: {msg}")
    return "; ".join(lines)


def parse_config(data: dict[str, Any], source: str = "config", base_dir: Path | None = None) -> JobConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    data = resolve_schema_files(data, base_dir)
    check_no_secrets(data)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format(err)}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--conf {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if overrides:
        data = merge(data, parse_overrides(overrides))
    return parse_config(data, source=str(path), base_dir=p.resolve().parent)
