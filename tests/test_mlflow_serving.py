"""The custom-model path against MLflow's own scoring server, the one Databricks runs for custom models."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from chispa import assert_df_equality

from jobs.pipeline import run_job
from tests.conftest import free_port, job_config

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="module")
def scoring_server(tmp_path_factory):
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    model_dir = tmp_path_factory.mktemp("model") / "echo"
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec(Array("string"), "stop")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("prefix", "string", "echo")]),
    )
    mlflow.pyfunc.save_model(str(model_dir), python_model=str(ASSETS / "echo_model.py"), signature=signature)
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
         "--host", "127.0.0.1", "-p", str(port), "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow models serve did not answer /ping within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_scoring_server_refuses_a_record_without_stop(scoring_server):
    # The reason the protocol always sends "stop": the server enforces the signature's inputs.
    r = requests.post(f"{scoring_server}/invocations", json={"dataframe_records": [{"prompt": "x"}]}, timeout=30)
    assert r.status_code == 400
    assert "stop" in r.json()["message"]


def test_custom_model_rows_through_mlflow_scoring_server(spark, scoring_server):
    name = f"prompts_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame([(1, "alpha STOP beta"), (2, "gamma"), (3, "delta"), (4, "")],
                          "id long, prompt string").createOrReplaceTempView(name)
    out = f"test.mlflow_{uuid.uuid4().hex[:8]}"
    cfg = job_config(
        input={"table": name}, output={"table": out},
        endpoint={"name": "echo", "type": "serving", "task": "custom", "url": f"{scoring_server}/invocations",
                  "stop": ["STOP"], "model_kwargs": {"prefix": "served"}, "batch_size": 2},
    )
    summary = run_job(spark, cfg)

    expected = spark.createDataFrame([
        (1, "served: alpha ", "ok", None, 200),
        (2, "served: gamma", "ok", None, 200),
        (3, "served: delta", "ok", None, 200),
        (4, None, "error", "empty_prompt", None),
    ], "id long, response string, status string, error string, http_status int")
    actual = spark.table(out).select("id", "response", "status", "error", "http_status")
    assert_df_equality(actual, expected, ignore_row_order=True, ignore_nullable=True)
    assert summary.by_status == {"ok": 3, "error": 1}
