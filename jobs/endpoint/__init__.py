"""The endpoint: what is called, with which credentials, under which limits, and how it fares.

- `resolve`: endpoint config -> `udfs.spec.EngineSpec` (URL, credentials, limits), and what no retry
  could fix refused before any row is sent (`preflight`);
- `info`: what the workspace says of a serving endpoint (AI Gateway limits, route optimization, state);
- `token_relay`: executors mode: the driver hands its current token to the tasks;
- `health`: the breaker's report across chunks, and what each chunk's tasks are told;
- `routing`: a split between endpoints: each row's endpoint from a hash of its id;
- `serving_endpoints`: create or update a serving endpoint from a YAML spec (`batch-inference-endpoint`),
  outside any run.
"""
