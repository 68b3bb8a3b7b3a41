"""A tiny MLflow pyfunc with the custom-model signature Databricks serves: `prompt`, `stop` -> string.

Saved by tests/test_mlflow_serving.py as a model-from-code and served by `mlflow models serve`.
"""

from __future__ import annotations

import mlflow
import pandas as pd


class EchoModel(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        params = params or {}
        out = []
        for prompt, stop in zip(model_input["prompt"], model_input["stop"]):
            text = f"{params.get('prefix', 'echo')}: {prompt}"
            for s in list(stop if stop is not None else []):
                if s in text:
                    text = text[: text.index(s)]
            out.append(text)
        return out


mlflow.models.set_model(EchoModel())
