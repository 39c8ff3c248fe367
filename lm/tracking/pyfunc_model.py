"""MLflow models-from-code entry of every registered lmforge model: loading the model runs this file,
which builds the pyfunc from importable code instead of unpickling an object (CVE-2024-37052)."""

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd


class LmforgePyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc face of an export folder: its fine-tuning method's Predictor, a DataFrame in and out."""

    def load_context(self, context) -> None:
        from lm.finetune import method
        from lm.models.folder import read_model_json

        folder = Path(context.artifacts["model"])
        self.predictor = method(read_model_json(folder)["task"]).Predictor(folder)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self.predictor.predict(frame, params)


mlflow.models.set_model(LmforgePyfunc())
