"""The pandas UDF and, beneath it, the engine that calls endpoints: UDF -> engine -> caller -> protocol -> HTTP.

- `inference`: the pandas UDF, the one module that imports Spark;
- `engine`: a task's runner (event loop, requests in flight across input batches);
- `router`: several endpoints in a task (primary, overflow, fallback, a split's choice), each a `Lane`;
- `caller`: one request (limits, retries, splitting, parsing), `retry`: the retry policy;
- `protocols`: the wire formats, `transport`: HTTP, `limits`: the governor (pauses, probes, a learned
  rate, the breaker), AIMD and rate limits;
- `structured`: response schemas (structured output): what has a column type, and answers checked;
- `spec`, `outcome`, `reasons`: the data a task gets, what each row gets, and the error codes;
- `auth` (secrets that never print), `prompts` (the blank rule, and characters per token), `transforms`,
  `loopback`.
"""

from udfs.auth import Secret
from udfs.engine import Engine
from udfs.outcome import Outcome
from udfs.protocols import BadResponse, Parsed, make_protocol
from udfs.spec import EngineSpec, RetrySpec

__all__ = ["BadResponse", "Engine", "EngineSpec", "Outcome", "Parsed", "RetrySpec", "Secret", "make_protocol"]
