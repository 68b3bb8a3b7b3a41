"""The one place a SparkSession is made, and the questions every step asks of one.

On Databricks (classic, shared or serverless) the active session is reused untouched. With
`SPARK_REMOTE=sc://host:port` (Databricks Connect, a Spark Connect server) we connect to it. Locally
we build `local[*]` with Delta Lake's extension and catalog, a warehouse inside the project, and
Python workers on this interpreter; `BI_CONNECT_PORT` also serves that session over Spark Connect on
127.0.0.1 (what the test suite and `benchmarks/throughput.py --connect` use).

Spark Connect (serverless, standard access, Databricks Connect) has no SparkContext and no RDDs and
may refuse to read a conf key: `is_connect` tells the two kinds apart, `conf_get` never raises.

Example::

    from jobs.session import get_spark, is_connect
    spark = get_spark()
    is_connect(spark)   # True on serverless: endpoint calls then come from the driver
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from jobs.output.tables import ensure_schema

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


def is_connect(spark: Any) -> bool:
    """A Spark Connect session (serverless, standard access, Databricks Connect, `sc://` URLs)?

    By class, not by `pyspark.sql.utils.is_remote()`: that reads a process-wide variable, and the
    test suite holds a classic and a Connect session in one process.
    """
    return type(spark).__module__.startswith("pyspark.sql.connect")


def conf_get(spark: Any, key: str) -> str | None:
    """A Spark conf value, or None when unset or refused (serverless raises for keys it does not expose)."""
    try:
        return spark.conf.get(key, None) or None
    except Exception:
        return None


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


def _with_connect_server(builder: SparkSession.Builder, port: int) -> SparkSession.Builder:
    """Serve this local session over Spark Connect on 127.0.0.1:`port` (pyspark's jars hold the server).

    The plugin starts the server inside the session's own JVM: Connect clients then share its
    catalog, warehouse and Delta extension. Bound to loopback like the rest of local Spark.
    """
    return (builder.config("spark.plugins", "org.apache.spark.sql.connect.SparkConnectPlugin")
            .config("spark.connect.grpc.binding.address", LOOPBACK)
            .config("spark.connect.grpc.binding.port", str(port)))


# Spark's default log4j profile announces itself, tells how to change the level and lets WARN through
# from the first line (NativeCodeLoader's "Unable to load native-hadoop library" on every laptop): a
# page of start-up chatter before a run says anything. Ours starts at WARN, the level Spark gives a
# Python driver (it counts as a shell, and any other level makes Spark print "Setting default log
# level"), quiets the known start-up warnings, and `get_spark` then sets BI_SPARK_LOG_LEVEL (ERROR).
_LOG4J2 = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.hadoop.name = org.apache.hadoop
logger.hadoop.level = error
"""


def _log4j2_file() -> Path:
    """Our log4j2 configuration, written where the JVM can read it."""
    path = Path(tempfile.gettempdir()) / "batch-inference-log4j2.properties"
    if not path.is_file() or path.read_text() != _LOG4J2:
        path.write_text(_LOG4J2)
    return path


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
        .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{_log4j2_file()}")
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
              warehouse: str | Path | None = None, connect_port: int | None = None) -> SparkSession:
    """Return the active session, connect to `SPARK_REMOTE`, or build the local one (Delta Lake enabled).

    `connect_port` (or `BI_CONNECT_PORT`) also serves the local session over Spark Connect.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if on_databricks():
        return SparkSession.builder.getOrCreate()
    if (os.environ.get("SPARK_REMOTE") or "").startswith("sc://"):
        # pyspark's own builder connects to SPARK_REMOTE and switches this process to Connect columns.
        return SparkSession.builder.getOrCreate()
    wh = Path(warehouse or os.environ.get("BI_WAREHOUSE_DIR") or Path.cwd() / "spark-warehouse").resolve()
    wh.mkdir(parents=True, exist_ok=True)
    builder = _local_builder(master or os.environ.get("BI_SPARK_MASTER", "local[*]"), wh, app_name)
    port = connect_port or int(os.environ.get("BI_CONNECT_PORT") or 0)
    if port:
        builder = _with_connect_server(builder, port)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("BI_SPARK_LOG_LEVEL", "ERROR"))
    register_local_tables(spark)
    return spark


def connect_session(url: str) -> SparkSession:
    """A Spark Connect client session for `sc://host:port` beside a classic session in this process.

    Through the Connect builder itself: pyspark's generic builder refuses a remote session in a
    process that already holds a classic one, which the test suite does on purpose (it then switches
    pyspark to Connect columns per test: `SPARK_CONNECT_MODE_ENABLED`).
    """
    from pyspark.sql.connect.session import SparkSession as ConnectSession

    return ConnectSession.builder.remote(url).getOrCreate()  # type: ignore[return-value]


def register_local_tables(spark: SparkSession) -> list[str]:
    """Re-register the Delta tables found in the local warehouse; returns their names.

    Local Spark keeps its catalog in memory, so a table written by an earlier process (a crashed
    run being resumed, `make demo` followed by a notebook) is unknown to a new session although its
    files are there. Databricks has a real metastore and never needs this.
    """
    wh = Path((conf_get(spark, "spark.sql.warehouse.dir") or "spark-warehouse").removeprefix("file:"))
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
