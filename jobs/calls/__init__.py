"""Calling: the pending rows cut into chunks, and each chunk's rows sent to the endpoint.

- `chunking`: chunk sizes, the first chunk, the one-chunk shortcut, the pace they learn (and the
  dry run's estimate);
- `plan`: executors mode: the job-wide limit split over tasks, one share of each endpoint's;
- `outcomes`: each row's outcome columns: the pandas UDF step (executors) or a chunk's rows on the
  driver, the `parsed` column, the embeddings' dimension;
- `chunk_run`: what both calling modes share while they walk the chunks;
- `driver` / `executors`: the two calling modes (`run.calls_from`), each committing its chunks with
  `jobs.output.commit`.
"""
