"""The Spark side of a run: config -> read -> survey -> stage -> call -> commit -> observe -> judge.

A map, in the order a run meets them (`pipeline.run_job` reads top to bottom in the same order):

- `cli/`: the console scripts (`run.py`: batch-inference; `serving_endpoint.py`); `config`: the typed
  config, every error naming its key; `secret_rules`: what counts as a secret in a file;
  `session`: the one place a SparkSession is made; `errors`: the job's own errors;
- `pipeline`: `run_job`, the run top to bottom, through the stages below;
- `input/`: `read` (requests, template, kept columns, `request_hash`, prechecks, pending rows),
  `stage` (the survey: one counting pass; the pending rows staged once);
- `endpoint/`: `resolve` (URL and credentials -> `udfs.spec.EngineSpec`), `info` (what the workspace
  says of a serving endpoint), `token_relay` (the driver's token for the tasks), `health` (the breaker
  across chunks), `routing` (a split: each row's endpoint from its id), `serving_endpoints` (create or
  update one);
- `calls/`: `chunking` (chunk sizes, the pace), `plan` (the job-wide limit split over tasks, one share
  of each endpoint's), `outcomes` (the UDF step, a chunk's rows on the driver), `chunk_run` (what both
  modes share), `driver` / `executors` (the two calling modes);
- `output/`: `commit` (the output table, each chunk's commit), `tables` (schemas, what a table may
  gain), `structured` (the `parsed` column's type);
- `observe/`: the end (progress, stats, runs table, MLflow, plots), `summary` (what a run reports),
  `verdict` (the exit code);
- `dryrun/`: `--dry-run`: `checks` (every check, one probe) and `forecast` (a few rows for real, the
  rest extrapolated);
- `local/`: laptop and CI only, not in the wheel (demo, the stand-in endpoint, the Delta jars).

`udfs` never imports `jobs`.
"""
