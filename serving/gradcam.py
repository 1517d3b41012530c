"""Grad-CAM over the backbone's last convolutional features: where in the crop the evidence for "ai_generated" is.

The forensic stem is inside the model, so the map is taken after it, on the backbone's final feature map (timm's
`forward_features`), and the gradient flows only through the pooling and the head: one forward of the backbone and
a backward through a few small layers, about the cost of one prediction.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class ExplainUnsupportedError(RuntimeError):
    """The backbone has no spatial feature map (e.g. a ViT's tokens), so Grad-CAM has nothing to localise."""


def grad_cam(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, np.ndarray]:
    """(probability of ai_generated, heatmap in [0, 1] at the input's height x width) for one image (1, 3, H, W)."""
    backbone = model.backbone
    with torch.no_grad():
        features = backbone.forward_features(model.stem(x))
    if features.ndim != 4 or features.shape[1] != backbone.num_features:
        raise ExplainUnsupportedError(
            f"the {type(backbone).__name__} backbone gives no (N, C, H, W) feature map; Grad-CAM needs a CNN backbone"
        )
    features = features.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logit = model.head(backbone.forward_head(features, pre_logits=True)).reshape(())
        (grad,) = torch.autograd.grad(logit, features)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    # the heatmap follows the raw logit (calibration is monotone); the probability is the calibrated one, as served
    calibrated = model.calibrate(logit.detach())
    return float(torch.sigmoid(calibrated)), cam.cpu().numpy()


def heatmap_png(crop: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> bytes:
    """The heatmap in a blue-to-red palette over the crop, as PNG bytes."""
    t = np.clip(cam, 0.0, 1.0)[..., None]
    colour = np.clip(1.5 - np.abs(4.0 * t - np.array([3.0, 2.0, 1.0])), 0.0, 1.0) * 255.0
    blended = (1.0 - alpha) * crop.astype(np.float32) + alpha * colour
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
