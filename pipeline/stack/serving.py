"""The registered model as an MLflow pyfunc model that loads anywhere the pinned libraries are
installed (MLflow "models from code": this file is the model's code, no pickled object).

The register stage logs it with the trained Keras model and the class names as artifacts and
this package as `code_paths` (the in-model `VGG16Preprocess` layer lives in `pipeline.core.model`), so
`mlflow.pyfunc.load_model("models:/vgg16-freezing-best@champion")` works from any folder and
`mlflow models serve` can serve it. Input: a batch of RGB images, uint8 0..255, shape
(n, size, size, 3) at the trained size. Output: a table with `predicted_class` (the class name)
and one probability column per class, in the order of `classes.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from pipeline.runtime import quiet

quiet.install()  # before keras loads (in load_context): TensorFlow's start-up noise, filtered


class FreezingStrategyClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import keras

        import pipeline.core.model  # noqa: F401  registers VGG16Preprocess (shipped in the model's code/)

        self.model = keras.models.load_model(context.artifacts["keras_model"], safe_mode=True)
        self.class_names = json.loads(Path(context.artifacts["class_names"]).read_text())

    # np.ndarray: a hint MLflow accepts without inferring a schema from it (the signature is explicit)
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        return predictions_table(self.model, self.class_names, model_input)


def predictions_table(model, class_names: list[str], images) -> pd.DataFrame:
    """`predicted_class` and one probability column per class for a batch of images."""
    images = np.asarray(images)
    expected = tuple(model.input_shape[1:])
    if images.ndim == 3:
        images = images[None]
    if images.shape[1:] != expected:
        raise ValueError(
            f"expected images of shape (n, {', '.join(map(str, expected))}) with RGB values 0..255, "
            f"got {images.shape}; resize them to the size the model was trained at"
        )
    probabilities = model.predict(images.astype("float32"), verbose=0)
    table = pd.DataFrame(probabilities.astype("float64"), columns=class_names)
    table.insert(0, "predicted_class", [class_names[i] for i in probabilities.argmax(axis=1)])
    return table


mlflow.models.set_model(FreezingStrategyClassifier())
