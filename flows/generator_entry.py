"""What MLflow runs to load a registered generator (models from code: nothing is unpickled)."""

import mlflow

from flows.pyfunc_model import GeneratorModel

mlflow.models.set_model(GeneratorModel())
