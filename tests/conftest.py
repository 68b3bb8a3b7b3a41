"""Shared fixtures: one local SparkSession with Delta Lake for the whole suite, and real HTTP servers."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def spark(warehouse: Path):
    from jobs.session import get_spark

    os.environ.setdefault("BI_JARS_DIR", str(ROOT / ".cache" / "jars"))
    # Python workers import test transforms (`tests.transforms:...`) as user modules.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    session = get_spark("tests", master="local[2]", warehouse=warehouse)
    yield session
    session.stop()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[LocalEndpoint]:
    with LocalEndpoint() as ep:
        yield ep


@pytest.fixture
def fresh_endpoint(endpoint: LocalEndpoint) -> LocalEndpoint:
    endpoint.reset()
    endpoint.latency_s = 0.0
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
