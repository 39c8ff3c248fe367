"""MLflow models-from-code entry: loading a registered lmforge model runs this file, which builds
the pyfunc from importable code, instead of unpickling an object (unpickling runs arbitrary code,
CVE-2024-37052)."""

import mlflow

from lm.registry import LmforgePyfunc

mlflow.models.set_model(LmforgePyfunc())
