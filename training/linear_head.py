"""A class-balanced, L2-regularised logistic regression solved to convergence: the fit the post-training heads share
(the source head's families, the residual verdict's real-or-generated), on inputs that are fixed once training ends.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fit_linear_head(inputs: np.ndarray, classes: np.ndarray, n_classes: int, c: float = 0.03) -> tuple[Any, Any]:
    """(weight, bias) of a class-balanced multinomial logistic regression with an L2 penalty of inverse strength
    ``c`` (scikit-learn's convention: loss summed over rows, times c, plus half the squared weights), fitted on
    standardised inputs and folded back so they apply to the raw ones; float64 L-BFGS, deterministic. Returned as
    float32 tensors of shapes (n_classes, inputs) and (n_classes,)."""
    import torch

    x = torch.as_tensor(inputs, dtype=torch.float64)
    y = torch.as_tensor(classes, dtype=torch.int64)
    mean, std = x.mean(dim=0), x.std(dim=0).clamp(min=1e-8)
    z = (x - mean) / std
    counts = torch.bincount(y, minlength=n_classes).double()
    present = counts > 0
    # each present class weighs as much as the others together (scikit-learn's "balanced")
    class_weight = torch.where(present, len(y) / (present.sum() * counts.clamp(min=1)), torch.zeros_like(counts))
    w = torch.zeros((n_classes, z.shape[1]), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")
    absent = torch.where(present, 0.0, -1e4).double()  # a class with no photos is never picked

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        per_photo = torch.nn.functional.cross_entropy(z @ w.T + b + absent, y, reduction="none")
        loss = (class_weight[y] * per_photo).sum() + 0.5 * w.pow(2).sum() / c
        loss.backward()
        return loss

    optimizer.step(objective)
    with torch.no_grad():
        weight = w / std
        bias = b + absent - (weight * mean).sum(dim=1)
    return weight.float(), bias.float()


def fit_binary_logit(inputs: np.ndarray, labels: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """The two-class fit of ``fit_linear_head`` as one logit, ``inputs @ weight + bias`` (float64): the difference of
    its two rows, which is what the post-training verdicts add to the model's logit."""
    weight, bias = fit_linear_head(inputs, labels, 2, c=c)
    return (weight[1] - weight[0]).double().numpy(), float(bias[1] - bias[0])
