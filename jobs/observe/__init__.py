"""Seeing a run and judging it: progress per chunk, the run's numbers, the runs table, MLflow and its
plots, what the run reports back and whether it failed.

- `lines`: the run's first line (what it will do) and last line (what it did, where the results are);
- `progress`: one line (or a terminal bar) after each committed chunk;
- `waiting`: what a silent run waits for, once nothing has come back for 30 s;
- `stats`: counts, latency, tokens and cost of a run, from the rows it wrote;
- `runs_table`: one Delta row per run, with the Databricks job run's ids;
- `tracking` and `plots`: the MLflow run, with a latency histogram and a throughput plot;
- `finish`: the end of a run, which does the three above, logs the closing line and never fails the run;
- `summary`: what a run reports back (`RunSummary`; `DryRunReport` for a dry run's checks);
- `verdict`: whether a finished run failed (`run.fail_on_error`, `run.max_error_share`): the exit code.
"""
