"""Shared fixtures: one session of each kind for the whole suite, and real HTTP servers.

- `spark`: local classic Spark with Delta Lake. Its JVM also runs a Spark Connect server on
  127.0.0.1 (the plugin in pyspark's own jars), with the same Delta extension, catalog and warehouse.
- `connect`: a Spark Connect client of that server, as serverless and Databricks Connect give one.
  pyspark builds Connect or classic columns by a process-wide switch, so the fixture turns it on for
  the test that asks for `connect` only; such a test uses no classic DataFrame.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from jobs.config import JobConfig, parse_config
from jobs.local.stand_in import LocalEndpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("warehouse")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CA bundle and no proxy from the machine: each case sets what it tests."""
    from tests.http_servers import ENV_PROXY, ENV_TLS

    for var in ENV_TLS + ENV_PROXY:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory):
    """A throwaway certificate authority: its PEM file, and a server TLS context it signed."""
    from tests.http_servers import throwaway_ca

    authority, server_ctx = throwaway_ca()
    pem = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(pem))
    return pem, server_ctx


@pytest.fixture(scope="session")
def connect_url() -> str:
    return f"sc://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def spark(warehouse: Path, connect_url: str):
    from jobs.session import get_spark

    os.environ.setdefault("BI_JARS_DIR", str(ROOT / ".cache" / "jars"))
    # Python workers import test transforms (`tests.transforms:...`) as user modules.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    session = get_spark("tests", master="local[2]", warehouse=warehouse,
                        connect_port=int(connect_url.rsplit(":", 1)[1]))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def connect_session(spark, connect_url: str):
    from jobs.session import connect_session

    session = connect_session(connect_url)
    yield session
    session.stop()


@pytest.fixture
def connect(connect_session, monkeypatch: pytest.MonkeyPatch):
    """The Spark Connect session, with pyspark's functions building Connect columns for this test."""
    monkeypatch.setenv("SPARK_CONNECT_MODE_ENABLED", "1")
    return connect_session


@pytest.fixture(scope="module")
def endpoint() -> Iterator[LocalEndpoint]:
    with LocalEndpoint() as ep:
        yield ep


@pytest.fixture
def fresh_endpoint(endpoint: LocalEndpoint) -> LocalEndpoint:
    endpoint.reset()
    endpoint.latency_s = 0.0
    endpoint.latency_of = None
    return endpoint


@pytest.fixture
def table_name() -> str:
    return f"test.t_{uuid.uuid4().hex[:10]}"


def job_config(**sections: Any) -> JobConfig:
    """A valid config with the given sections merged over small-test defaults."""
    base: dict[str, Any] = {
        "input": {"table": "test.unused"},
        "output": {"table": "test.unused_out"},
        "endpoint": {"name": "local", "type": "driver_proxy", "port": 3000},
        "limits": {"max_concurrency": 4},
        "retry": {"backoff_base_s": 0.01, "backoff_max_s": 0.05},
        # Tests of error rows assert the rows; the exit that many failed rows cause is tested on its own
        # (tests/test_verdict.py), so here a run with mostly failed rows still returns its summary.
        "run": {"chunk_rows": 1000, "task_slots": 2, "max_error_share": 1.0},
    }
    for key, value in sections.items():
        # The input source is one of table/path/query: a given input replaces the default whole.
        base[key] = value if key == "input" else {**base.get(key, {}), **value}
    return parse_config(base)
