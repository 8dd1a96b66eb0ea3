"""The trained model into the MLflow Model Registry: logged as a pyfunc model from code
(pipeline/stack/serving.py, the `pipeline` package shipped as its code), described, tagged, and
the alias `champion` pointed at it. Used by the register stage only; its output is this entry."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import mlflow

from pipeline.stack.tracking import CHAMPION, MAX_TAG_LENGTH, redact


def log_classifier(
    keras_model_path: Path, class_names_path: Path, example_images, registered_name: str, model_card: dict
) -> dict:
    """Log the trained model as an MLflow pyfunc model (`pipeline/stack/serving.py`: images in, class
    names and probabilities out; the `pipeline` package shipped as its code, so it loads from any
    folder), with a signature and an input example, register it under `registered_name`, describe
    and tag the new version with `model_card` ({"description": ..., "tags": {...}}), and point the
    alias `champion` at it. Returns {"model_uri", "version"}.

    Explicit pip requirements skip MLflow's requirement inference, which loads the model in a
    subprocess (~15 s for VGG16).
    """
    import numpy as np
    from mlflow.models import infer_signature

    import pipeline.core.model  # noqa: F401  registers VGG16Preprocess before loading
    from pipeline.stack import serving

    model = keras.models.load_model(keras_model_path, safe_mode=True)
    class_names = json.loads(Path(class_names_path).read_text())
    example = np.asarray(example_images, dtype=np.uint8)
    signature = infer_signature(example, serving.predictions_table(model, class_names, example))
    info = _log_pyfunc(keras_model_path, class_names_path, example, signature, registered_name)
    client = mlflow.MlflowClient()
    version = info.registered_model_version
    client.update_model_version(registered_name, version, description=model_card["description"])
    for key, value in model_card["tags"].items():
        client.set_model_version_tag(registered_name, version, key, redact(str(value))[:MAX_TAG_LENGTH])
    client.set_registered_model_alias(registered_name, CHAMPION, version)
    return {"model_uri": info.model_uri, "version": version}


def _log_pyfunc(keras_model_path, class_names_path, example, signature, registered_name: str):
    """`serving.py` as a models-from-code pyfunc model, the `pipeline` package as its code."""
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    from pipeline.stack import serving

    package = Path(serving.__file__).parents[1]  # pipeline/: serving.py imports from the core
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(serving.__file__)),
        artifacts={"keras_model": str(keras_model_path), "class_names": str(class_names_path)},
        code_paths=[str(package)],
        signature=signature,
        input_example=example,
        pip_requirements=[
            f"mlflow=={mlflow.__version__}",
            f"tensorflow=={tf.__version__}",
            f"keras=={keras.__version__}",
            f"numpy=={np.__version__}",
            f"pandas=={pd.__version__}",
        ],
        registered_model_name=registered_name,
    )
