"""Entry points and Spark-side plumbing: config, session, input/output, the batch job."""
