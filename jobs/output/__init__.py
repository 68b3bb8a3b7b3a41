"""The output table: its schema, its creation, and each chunk's commit to Delta.

- `commit`: the output table's schema and creation, and each chunk's idempotent append or MERGE;
- `tables`: schema names, how two table schemas differ, what an existing table may gain;
- `structured`: structured output: the `parsed` column's Spark type from the response schema.
"""
