"""The detector as an MLflow pyfunc (models-from-code): rows of image bytes in, AI probabilities out.

MLflow loads this file when someone calls ``mlflow.pyfunc.load_model`` on a registered ``aipd-detector``; it needs
this project installed. Serving does not go through it: it loads the checkpoint directly (``app.registry``).
"""

from __future__ import annotations

import mlflow
import mlflow.pyfunc


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from app.model import load_checkpoint

        self.loaded = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        from app.images import decode_image
        from app.transforms import eval_preprocess, to_model_input

        crop = self.loaded.preprocess.crop_size
        crops = [eval_preprocess(decode_image(bytes(data)), crop) for data in model_input["image"]]
        with torch.inference_mode():
            logits = self.loaded.model(to_model_input(np.stack(crops)))
        return torch.sigmoid(logits).numpy()


mlflow.models.set_model(DetectorPyfunc())
