"""The MLflow pyfunc wrapper of a trained model, logged as code (MLflow's models-from-code), so no pickle.

`mlflow.pyfunc.load_model("models:/<name>/<version>").predict(["some text"])` returns the embeddings.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np


class LLM2VecGenPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from components.model import LLM2VecGen

        self.model = LLM2VecGen.load(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        texts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        return np.asarray(self.model.encode(texts, **(params or {})))


mlflow.models.set_model(LLM2VecGenPyfunc())
