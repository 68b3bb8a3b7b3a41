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
from pathlib import Path

from pyspark.sql import SparkSession

from jobs.delta_jars import fetch, jars_dir

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def _local_builder(master: str, warehouse: Path, app_name: str) -> SparkSession.Builder:
    jars = fetch(jars_dir())
    # Local Spark listens and talks on loopback only: without this it picks the machine's network
    # address ("using 192.0.2.2 instead") and opens its driver and block manager ports there.
    os.environ.setdefault("SPARK_LOCAL_IP", LOOPBACK)
    # Python workers must run the interpreter that has pandas and pyarrow (this one).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    return (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.jars", ",".join(str(j) for j in jars))
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
        spark.sql(f"CREATE SCHEMA IF NOT EXISTS `{schema}`")
        spark.sql(f"CREATE TABLE IF NOT EXISTS `{schema}`.`{table}` USING DELTA LOCATION '{table_dir}'")
        found.append(f"{schema}.{table}")
    return found
