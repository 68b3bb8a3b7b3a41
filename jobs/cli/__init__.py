"""The console scripts: each parses its arguments, then calls library functions of `jobs`.

- `batch-inference` (`jobs.cli.run`): the batch job;
- `batch-inference-endpoint` (`jobs.cli.serving_endpoint`): create or update a serving endpoint.
"""
