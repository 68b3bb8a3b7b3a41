"""The one place a SparkSession is made.

On Databricks (classic, shared or serverless) the active session is reused untouched. Locally we
build `local[*]` with Delta Lake's extension and catalog, a warehouse inside the project, and Python
workers on this interpreter.

Example::

    from jobs.session import get_spark
    spark = get_spark()
"""

from __future__ import annotations

import logging
import os
import sys
from importlib import metadata
from pathlib import Path

from pyspark.sql import SparkSession

from jobs.tables import ensure_schema

log = logging.getLogger("batch_inference")

LOOPBACK = "127.0.0.1"
SCALA = "2.13"
# Written last by the jar fetcher (`jobs.local.delta_jars`): a folder without it is incomplete.
JARS_MARKER = ".complete"


def delta_coordinates() -> tuple[str, str]:
    """(artifactId, version) of the Delta jar matching the installed delta-spark and pyspark."""
    import pyspark

    spark_mm = ".".join(pyspark.__version__.split(".")[:2])
    return f"delta-spark_{spark_mm}_{SCALA}", metadata.version("delta-spark")


def jars_dir(root: Path | None = None) -> Path:
    """Where the Delta jars of this pyspark/delta-spark pair are cached: `$BI_JARS_DIR` or `.cache/jars`."""
    base = Path(os.environ.get("BI_JARS_DIR") or (root or Path.cwd()) / ".cache" / "jars")
    artifact, version = delta_coordinates()
    return base / f"{artifact}-{version}"


def cached_jars(folder: Path) -> list[Path]:
    if not (folder / JARS_MARKER).exists():
        return []
    return sorted(folder.glob("*.jar"))


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def _with_delta_jars(builder: SparkSession.Builder) -> SparkSession.Builder:
    """The cached jars (`make install` fetches them once); without them, Spark's own resolver fetches
    Delta from Maven Central at each start (cached by Ivy in ~/.ivy2)."""
    jars = cached_jars(jars_dir())
    if jars:
        return builder.config("spark.jars", ",".join(str(j) for j in jars))
    artifact, version = delta_coordinates()
    log.warning("no cached Delta jars in %s (run `make install`); resolving io.delta:%s:%s through Ivy",
                jars_dir(), artifact, version)
    return builder.config("spark.jars.packages", f"io.delta:{artifact}:{version}")


def _local_builder(master: str, warehouse: Path, app_name: str) -> SparkSession.Builder:
    # Local Spark listens and talks on loopback only: without this it picks the machine's network
    # address ("using 192.0.2.2 instead") and opens its driver and block manager ports there.
    os.environ.setdefault("SPARK_LOCAL_IP", LOOPBACK)
    # Python workers must run the interpreter that has pandas and pyarrow (this one).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    return (
        _with_delta_jars(SparkSession.builder.master(master).appName(app_name))
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.warehouse.dir", str(warehouse))
        .config("spark.driver.bindAddress", LOOPBACK)
        .config("spark.driver.host", LOOPBACK)
        .config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        # Delta rebuilds table state with 50 partitions by default: far too many for a laptop.
        .config("spark.databricks.delta.snapshotPartitions", "2")
        .config("spark.databricks.delta.properties.defaults.enableDeletionVectors", "false")
        .config("spark.driver.memory", os.environ.get("BI_DRIVER_MEMORY", "2g"))
        .config("spark.sql.session.timeZone", "UTC")
    )


def get_spark(app_name: str = "batch-inference", *, master: str | None = None,
              warehouse: str | Path | None = None) -> SparkSession:
    """Return the active session, or build the local one (Delta Lake enabled)."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if on_databricks():
        return SparkSession.builder.getOrCreate()
    wh = Path(warehouse or os.environ.get("BI_WAREHOUSE_DIR") or Path.cwd() / "spark-warehouse").resolve()
    wh.mkdir(parents=True, exist_ok=True)
    spark = _local_builder(master or os.environ.get("BI_SPARK_MASTER", "local[*]"), wh, app_name).getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("BI_SPARK_LOG_LEVEL", "ERROR"))
    register_local_tables(spark)
    return spark


def register_local_tables(spark: SparkSession) -> list[str]:
    """Re-register the Delta tables found in the local warehouse; returns their names.

    Local Spark keeps its catalog in memory, so a table written by an earlier process (a crashed
    run being resumed, `make demo` followed by a notebook) is unknown to a new session although its
    files are there. Databricks has a real metastore and never needs this.
    """
    wh = Path(spark.conf.get("spark.sql.warehouse.dir").removeprefix("file:"))
    found = []
    for log_dir in sorted(wh.glob("*/_delta_log")) + sorted(wh.glob("*.db/*/_delta_log")):
        table_dir = log_dir.parent
        if table_dir.parent == wh:
            schema, table = "default", table_dir.name
        else:
            schema, table = table_dir.parent.name.removesuffix(".db"), table_dir.name
        ensure_schema(spark, f"{schema}.{table}")
        spark.sql(f"CREATE TABLE IF NOT EXISTS `{schema}`.`{table}` USING DELTA LOCATION '{table_dir}'")
        found.append(f"{schema}.{table}")
    return found
