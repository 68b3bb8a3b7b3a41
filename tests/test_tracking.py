"""MLflow tracking: optional (the wheel does not depend on MLflow), never fatal."""

from __future__ import annotations

import logging
import sys

from jobs.observe.stats import RunStats
from jobs.observe.tracking import log_to_mlflow
from tests.conftest import job_config


def test_without_mlflow_installed_logging_is_skipped_with_a_reason(spark, monkeypatch, caplog):
    for module in ("mlflow", "mlflow.entities", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, module, None)  # what `import mlflow` meets where it is not installed
    cfg = job_config(mlflow={"enabled": True})
    with caplog.at_level(logging.WARNING, logger="batch_inference"):
        assert log_to_mlflow(spark, cfg, {"run_id": "r"}, RunStats(), []) is None
    assert "mlflow is not installed" in caplog.text
