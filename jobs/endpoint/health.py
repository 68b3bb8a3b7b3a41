"""The run's view of the endpoint across chunks: the breaker's report, and what the next chunk's tasks
are told.

Each task has its own breaker (`udfs.limits.Governor`): when nothing has answered for
`retry.breaker_s`, the rest of its rows fail fast as `endpoint_unavailable`. The driver learns of it
from the committed chunk (one small query, only for a chunk with errors), says so, and starts the
next chunk's tasks half-open: each sends one probe first, and fails its rows at once if the probe
fails too. So an endpoint down for the whole run costs one breaker's time, not one per chunk; a rerun
sends those rows again. Each chunk's tasks also get the credentials as they are when it starts
(`udfs.auth.Credentials.for_tasks`).

Example::

    health = EndpointHealth()
    spec_for_chunk = health.for_chunk(spec)
    health.after_chunk(spark, "main.gold.completions", run_id, chunk=0, counts={"ok": 0, "error": 1000})
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from pyspark.sql import SparkSession, functions as F

from udfs import reasons
from udfs.spec import EngineSpec

log = logging.getLogger("batch_inference")

DOWN_EARLIER = "unavailable in an earlier chunk of this run"


@dataclass
class EndpointHealth:
    # Why the endpoint is down (the first `endpoint_unavailable` detail), None while it answers.
    down: str | None = None
    # Rows of this run that failed as `endpoint_unavailable`, so far.
    unavailable_rows: int = 0
    # The run's endpoint names (several: each task's lanes carry their breakers, no half-open chunks).
    endpoints: tuple[str, ...] = ()

    def for_chunk(self, spec: EngineSpec) -> EngineSpec:
        """The spec a chunk's tasks get: current credentials, and half-open if the endpoint is down."""
        creds = spec.credentials.for_tasks() if spec.credentials is not None else None
        return replace(spec, credentials=creds, endpoint_down=DOWN_EARLIER if self.down else None)

    def credentials_for(self, spec: EngineSpec) -> EngineSpec:
        """With several endpoints: current credentials only (each task's `udfs.router.Lane` carries an
        endpoint's breaker across the chunks its process runs)."""
        creds = spec.credentials.for_tasks() if spec.credentials is not None else None
        return replace(spec, credentials=creds)

    def after_chunk(self, spark: SparkSession, table: str, run_id: str, chunk: int, counts: dict[str, int]) -> None:
        """After a committed chunk: say which endpoint went unavailable in it, with how many rows and why."""
        if not counts.get("error"):
            self.down = None
            return
        prefix = f"{reasons.ENDPOINT_UNAVAILABLE}:"
        rows = (spark.read.table(table).where((F.col("run_id") == run_id) & F.col("error").startswith(prefix))
                .groupBy("endpoint").agg(F.count(F.lit(1)).alias("n"), F.min("error").alias("example"))
                .orderBy("endpoint").collect())
        total = sum(r["n"] for r in rows)
        new = total - self.unavailable_rows
        self.unavailable_rows = total
        if new > 0:
            if self.down is None:
                self.down = rows[0]["example"][len(prefix):].strip()
            named = "; ".join(f"{r['endpoint']!r}: {r['n']} row(s) so far ({r['example'][len(prefix):].strip()})"
                              for r in rows)
            later = ("later chunks probe once before sending" if len(self.endpoints) < 2 else
                     "each task keeps an endpoint's breaker for the chunks it runs")
            log.warning("chunk %d: %d row(s) failed fast as %s, the endpoint unavailable: %s; %s; rerun to send "
                        "these rows again", chunk + 1, new, reasons.ENDPOINT_UNAVAILABLE, named, later)
        elif counts.get("ok"):
            self.down = None
