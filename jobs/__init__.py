"""The Spark side of a run: config -> read -> survey -> stage -> call -> commit -> observe -> judge.

A map, in the order a run meets them (`pipeline.run_job` reads top to bottom in the same order):

- `cli/`: the console scripts (`run.py`: batch-inference; `serving_endpoint.py`); `config`: the typed
  config, every error naming its key; `secret_rules`: what counts as a secret in a file;
  `session`: the one place a SparkSession is made;
- input: `read` (requests, template, kept columns, `request_hash`, prechecks, pending rows),
  `stage` (the survey: one counting pass; the pending rows staged once);
- the endpoint: `resolve` (URL and credentials -> `udfs.spec.EngineSpec`), `endpoint_info` (what the
  workspace says of a serving endpoint), `endpoint_health` (the breaker across chunks), `token_relay`
  (the driver's token for the tasks), `plan` (the job-wide limit split over tasks, one share of each
  endpoint's), `routing` (a split: each row's endpoint from its id), `serving_endpoints` (create or
  update one);
- the run: `chunking` (chunk sizes, the pace), `chunk_run` (what both modes share),
  `driver_calls` / `executor_calls` (the two calling modes), `call` (the UDF step, a chunk's rows
  on the driver), `structured` (the `parsed` column's type);
- output: `commit` (the output table, each chunk's commit), `tables` (schemas, what a table may gain);
- the end: `observe/` (progress, stats, runs table, MLflow, plots), `verdict` (the exit code),
  `summary` / `errors` (what a run reports); `dryrun` and `forecast` (`--dry-run`);
- `local/`: laptop and CI only, not in the wheel (demo, the stand-in endpoint, the Delta jars).

`udfs` never imports `jobs`.
"""
