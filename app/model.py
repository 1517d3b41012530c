"""The detector: a fixed forensic stem, a timm backbone, a small binary head (blended, once fitted, with a linear
verdict on the residual's fixed statistics) and, when the training data names each AI photo's generator family, a
second head that says which family it looks like; plus checkpoints.

The stem lives inside the model so that every caller (training, evaluation, batch scans, serving)
feeds the same thing: float NCHW in [0, 1]. A checkpoint directory carries the weights together with
the model config and the preprocessing settings, so serving never guesses how to prepare an image.
"""

from __future__ import annotations

import json
import socket
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from app.checkpoint_files import CONFIG_FILE, VAL_SCORES_FILE, WEIGHTS_FILE
from app.errors import UserError
from app.operating_point import Calibration, OperatingPoint

CHECKPOINT_FORMAT = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The high-pass residual of an 8-bit photo in [0, 1] is a few hundredths; times 16 it spans about the range of an
# ImageNet-normalised input, so the first layers (and pretrained weights) see activations of the size they expect,
# while a larger factor would mostly amplify edges, i.e. content.
STEM_SCALE = 16.0
# The energy below which a residual is not scaled up (stem_norm): a flat photo's residual is only rounding noise.
STEM_NORM_FLOOR = 1e-4

# Values of ModelConfig.pretrained_weights that ask timm's hub instead of naming a local file:
# "hub" (the backbone's default pretrained tag) or "hub:<tag>" (e.g. "hub:ra_in1k").
HUB_PREFIX = "hub"


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained weights were asked for and cannot be had (no such file, or no hub offline)."""


@dataclass
class ModelConfig:
    """Everything needed to rebuild the architecture; saved in every checkpoint's config.json.

    pretrained_weights: None (random init), a local file holding a timm backbone state_dict (.pt,
    .pth, .bin or .safetensors; classifier keys are ignored), "hub" (timm's default pretrained
    tag for the backbone) or "hub:<tag>".
    """

    backbone: str = "efficientnet_b0"
    hidden: int = 512
    dropout: float = 0.3
    forensic_stem: bool = True
    # Each photo's residual scaled to unit RMS: the detector then sees the residual's pattern, not its energy, which
    # blur and downscaling cut by orders of magnitude (benchmarks/RESULTS.md, "Verdicts").
    stem_norm: bool = False
    pretrained_weights: str | None = None
    # The source head's classes: "none" (a camera, app.data.NO_SOURCE) first, then the generator families the
    # training data named; empty: the binary head alone.
    source_families: list[str] = field(default_factory=list)
    # The side of the residual's log power spectrum grid the source head reads beside the pooled features, and the
    # residual verdict reads (0: none, as checkpoints from before it were trained).
    source_spectrum: int = 0
    # The largest lag of the residual's 2-periodic local correlations the source head and the residual verdict read
    # too (0: none, as checkpoints from before them were trained).
    source_phase: int = 0
    # The verdict blended with a linear model on those residual statistics, fitted after training (ResidualVerdict);
    # False: the network's logit alone, as checkpoints from before it were saved.
    residual_verdict: bool = False


@dataclass
class PreprocessSettings:
    crop_size: int = 224


class ForensicStem(nn.Module):
    """Fixed high-pass front-end: each channel minus its 3x3 local mean, times STEM_SCALE.

    SRM-style forensic front-ends (Fridrich & Kodovsky 2012; Zhou et al. 2018) suppress content so the
    network learns from pixel-level traces (demosaicing, sensor noise, upsampling periodicity). The
    kernel is a buffer, not a parameter: training cannot turn it back into a content detector, and
    it is saved with the weights.
    """

    def __init__(self, scale: float = STEM_SCALE, normalize: bool = False) -> None:
        super().__init__()
        kernel = -torch.full((3, 3), 1.0 / 9.0)
        kernel[1, 1] += 1.0
        self.register_buffer("kernel", (kernel * scale).expand(3, 1, 3, 3).clone())
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        residual = F.conv2d(padded, self.kernel.to(x.dtype), groups=3)
        if not self.normalize:
            return residual
        # in float32: a bf16 mean of squares loses the small residuals of a soft photo; the floor keeps a flat
        # photo's (nearly zero) residual from being blown up to noise
        energy = residual.float().pow(2).mean(dim=(1, 2, 3), keepdim=True)
        return (residual.float() * torch.rsqrt(energy + STEM_NORM_FLOOR)).to(residual.dtype)


class ResidualSpectrum(nn.Module):
    """A photo's high-pass residual (grey) as its log power spectrum, averaged onto a ``grid`` x ``grid`` frequency
    grid and standardised per photo. Fixed, like the stem: a generator's upsampling leaves peaks at the frequencies
    of its layers, which a linear probe on this spectrum tells apart and the verdict's pooled features do not keep
    (benchmarks/RESULTS.md, "Which generator"). The grid spans the whole frequency range at any crop size."""

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.highpass = ForensicStem(scale=1.0)  # the stem's residual; its scale is a constant the norm removes
        self.norm = nn.LayerNorm(grid * grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 and outside autocast: the FFT has no bf16 kernel, and the log of a small power needs the range
        with torch.autocast(device_type=x.device.type, enabled=False):
            residual = self.highpass(x.float()).mean(dim=1)  # grey: the residual is linear in the channels
            power = torch.fft.fftshift(torch.fft.fft2(residual).abs().pow(2), dim=(-2, -1))
            spectrum = F.adaptive_avg_pool2d(torch.log(power + 1e-12).unsqueeze(1), self.grid).flatten(1)
            # the norm's weights cast to float32 here: a bf16 copy of the model keeps this part in float32
            weight, bias = self.norm.weight.float(), self.norm.bias.float()
            return F.layer_norm(spectrum, spectrum.shape[1:], weight, bias, self.norm.eps)


class ResidualPhase(nn.Module):
    """A photo's high-pass residual, per channel, correlated with itself at every small offset up to ``lags`` pixels,
    separately for each of the four pixel positions of a 2 x 2 grid, over the residual's energy. A generator that
    upsamples by two makes these statistics 2-periodic, each operator in its own way (a nearest upsampling copies a
    pixel's residual to its right neighbour, a bilinear one averages it): what the spectrum's coarse grid blurs
    together (benchmarks/RESULTS.md, "Which generator"). The 2 x 2 grid starts at the crop's corner, so it is the
    generator's grid where the crop starts at an even offset of the photo (the demo's center crops do), and that grid
    shifted by a pixel where it starts at an odd one."""

    def __init__(self, lags: int) -> None:
        super().__init__()
        self.lags = lags
        self.offsets = [(dy, dx) for dy in range(lags + 1) for dx in range(-lags, lags + 1) if dy > 0 or dx >= 0]
        self.highpass = ForensicStem(scale=1.0)  # the stem's residual; the ratio to its energy removes the scale

    @property
    def width(self) -> int:
        return 3 * 4 * len(self.offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):  # ratios of small products need float32
            residual = self.highpass(x.float())
            n, c, h, w = residual.shape
            # whole 2 x 2 cells starting on an even row and column: position (0, 0) is a cell's first pixel
            start = self.lags + self.lags % 2
            rows, cols = (h - start - self.lags) // 2 * 2, (w - start - self.lags) // 2 * 2
            base = residual[:, :, start : start + rows, start : start + cols]
            scaled = base / (base.pow(2).mean(dim=(2, 3), keepdim=True) + 1e-12)  # over the energy, once
            cells = []
            for dy, dx in self.offsets:
                shifted = residual[:, :, start + dy : start + dy + rows, start + dx : start + dx + cols]
                product = (scaled * shifted).reshape(n, c, rows // 2, 2, cols // 2, 2)
                cells.append(product.mean(dim=(2, 4)).reshape(n, c, 4))
            return torch.stack(cells, dim=-1).flatten(1)


class ImageNetNormalize(nn.Module):
    """What the backbone expects when the forensic stem is off."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class Calibrate(nn.Module):
    """The model's calibration (Platt scaling of its logit), inside the model like the stem, so every caller's
    sigmoid gives the calibrated probability. Training runs it as the identity; a checkpoint's config.json says
    what it is, and the buffers are not in the state_dict, so checkpoints of either kind load into either."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()), persistent=False)
        self.register_buffer("bias", torch.zeros(()), persistent=False)

    def set(self, calibration: Calibration) -> None:
        self.scale.fill_(calibration.scale)
        self.bias.fill_(calibration.bias)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale.to(logits.dtype) + self.bias.to(logits.dtype)


class ResidualVerdict(nn.Module):
    """The verdict as a linear blend of the network's logit and a linear model on the fixed residual statistics
    (`Detector.residual_statistics`): ``head_scale * logit + statistics @ weight + bias``.

    Blur and JPEG wipe most of what the backbone's pooled features tell apart, while the residual's spectrum and
    2-periodic correlations keep evidence a linear model can still read; fitted after training on the training
    photos clean and degraded, then blended with the logit on validation (training.residual_verdict). Until a
    checkpoint's config.json gives its values it is inactive (training runs without it, at no cost); the buffers are
    not in the state_dict, so checkpoints of either kind load into either, like the calibration."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("head_scale", torch.ones(()), persistent=False)
        self.register_buffer("weight", torch.zeros(width), persistent=False)
        self.register_buffer("bias", torch.zeros(()), persistent=False)
        self.active = False  # a python bool: a trace of the model takes one branch

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    def set(self, values: dict[str, Any]) -> None:
        """Fill in a fitted verdict: {"head_scale": float, "weight": [float] * width, "bias": float}."""
        weight = torch.as_tensor(values["weight"], dtype=torch.float64)
        if weight.shape != (self.width,):
            raise ValueError(
                f"a residual verdict of {tuple(weight.shape)} weights does not fit {self.width} statistics"
            )
        with torch.no_grad():
            self.head_scale.fill_(float(values["head_scale"]))
            self.weight.copy_(weight.to(self.weight.dtype))
            self.bias.fill_(float(values["bias"]))
        self.active = True

    def forward(self, logit: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        # in float32 and outside autocast: a sum of ~1,000 products loses the verdict's precision in bf16
        with torch.autocast(device_type=logit.device.type, enabled=False):
            blended = self.head_scale.float() * logit.float() + statistics.float() @ self.weight.float()
            return (blended + self.bias.float()).to(logit.dtype)


class Detector(nn.Module):
    """Float NCHW in [0, 1] -> one calibrated logit per image (positive = ai_generated; the residual verdict's blend
    where a fitted one is set); with ``with_sources`` also
    the source head's logits (one per entry of ``cfg.source_families``), which DDP needs to come out of forward."""

    def __init__(self, cfg: ModelConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem: nn.Module = ForensicStem(normalize=cfg.stem_norm) if cfg.forensic_stem else ImageNetNormalize()
        self.backbone = backbone
        # timm models with a pre-logits stage (MobileNetV3) pool to head_hidden_size, not num_features
        features = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.head = nn.Sequential(
            nn.Linear(features, cfg.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, 1),
        )
        self.calibrate = Calibrate()
        # the residual's spectrum and 2-periodic correlations where the config asks for them, read by the source head
        # (on the pooled features beside the binary head) and by the residual verdict
        families = bool(cfg.source_families)
        read = families or cfg.residual_verdict
        self.spectrum = ResidualSpectrum(cfg.source_spectrum) if read and cfg.source_spectrum else None
        self.phase = ResidualPhase(cfg.source_phase) if read and cfg.source_phase else None
        if self.spectrum is not None and not families:
            # nothing trains the spectrum's norm without a source head (DDP refuses parameters without gradients)
            self.spectrum.norm.requires_grad_(False)
        width = (cfg.source_spectrum**2 if self.spectrum is not None else 0) + (
            self.phase.width if self.phase is not None else 0
        )
        self.source_head = nn.Linear(features + width, len(cfg.source_families)) if families else None
        self.residual_verdict = ResidualVerdict(width) if cfg.residual_verdict and width else None

    def forward(self, x: torch.Tensor, with_sources: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(self.stem(x))
        verdict = self.residual_verdict if self.residual_verdict is not None and self.residual_verdict.active else None
        sources_read = with_sources and self.source_head is not None and self.has_residual_statistics
        # once for both readers; not at all while neither needs them (training)
        statistics = self.residual_statistics(x) if verdict is not None or sources_read else None
        logit = self.head(features).squeeze(1)
        if verdict is not None:
            logit = verdict(logit, statistics)
        logit = self.calibrate(logit)
        if not with_sources:
            return logit
        if self.source_head is None:
            return logit, features.new_zeros((features.shape[0], 0))
        return logit, self.source_head(self.source_inputs(x, features, statistics))

    def source_inputs(
        self, x: torch.Tensor, features: torch.Tensor, statistics: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What the source head reads: the pooled features, then the fixed residual statistics the config asks for
        (``statistics``: those already computed for ``x``)."""
        if statistics is None:
            statistics = self.residual_statistics(x)
        return features if statistics is None else torch.cat([features, statistics.to(features.dtype)], dim=1)

    @property
    def has_residual_statistics(self) -> bool:
        return self.spectrum is not None or self.phase is not None

    def residual_statistics(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fixed residual statistics (spectrum, then correlations; float32) the source head and the residual
        verdict read, None where the config has none: the last columns of `source_inputs`."""
        parts = [module(x) for module in (self.spectrum, self.phase) if module is not None]
        return torch.cat(parts, dim=1) if parts else None


class AllLogits(nn.Module):
    """The detector's logits in one tensor, (N, 1 + families): the binary logit first, then the source head's. What
    the model runtime traces and captures, so a batch's verdicts and families come from one forward pass."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector
        self.training = detector.training  # a wrapper of a model in eval mode is in eval mode (tracing checks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit, sources = self.detector(x, with_sources=True)
        return torch.cat([logit.unsqueeze(1), sources], dim=1)


def source_probabilities(logits: Any) -> Any:
    """Softmax over the source columns of AllLogits' output (numpy, float64), rows summing to one."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def build_model(cfg: ModelConfig) -> Detector:
    """A Detector with a fresh head; the backbone is random unless cfg.pretrained_weights names weights."""
    weights = cfg.pretrained_weights
    if weights is not None and (weights == HUB_PREFIX or weights.startswith(HUB_PREFIX + ":")):
        backbone = _hub_backbone(cfg.backbone, weights)
    else:
        backbone = _create_backbone(cfg.backbone)
        if weights is not None:
            _load_backbone_file(backbone, cfg.backbone, Path(weights))
    return Detector(cfg, backbone)


@dataclass
class LoadedModel:
    model: Detector
    model_cfg: ModelConfig
    preprocess: PreprocessSettings
    threshold: float
    metrics: dict = field(default_factory=dict)
    calibration: Calibration = field(default_factory=Calibration)
    operating_point: dict = field(default_factory=dict)  # how the threshold was set (OperatingPoint.tags)


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    model_cfg: ModelConfig,
    preprocess: PreprocessSettings,
    threshold: float = 0.5,
    metrics: dict | None = None,
) -> Path:
    """Write model.pt (state_dict) and config.json; DDP- and torch.compile-wrapped models are unwrapped."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inner = _unwrap(model)
    state = {key: value.detach().cpu() for key, value in inner.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    config = {
        "format": CHECKPOINT_FORMAT,
        "model": asdict(model_cfg),
        "preprocess": asdict(preprocess),
        "threshold": float(threshold),
        "metrics": metrics or {},
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
    }
    _write_config(directory, config)  # config.json last and atomic: its presence means complete
    return directory


def _write_config(directory: Path, config: dict[str, Any]) -> None:
    text = json.dumps(config, indent=2, sort_keys=True, default=_json_scalar)
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(directory / CONFIG_FILE)


def copy_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Copy a checkpoint's model files and its validation scores (and nothing else a training checkpoint holds,
    such as optimizer state)."""
    import shutil

    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if (source / VAL_SCORES_FILE).is_file():
        shutil.copy2(source / VAL_SCORES_FILE, target / VAL_SCORES_FILE)
    for name in (WEIGHTS_FILE, CONFIG_FILE):  # config.json last: its presence means complete
        shutil.copy2(source / name, target / name)
    return target


def save_val_scores(directory: str | Path, labels: Any, logits: Any) -> None:
    """The validation scores a training computed for this checkpoint, so its operating point is fitted on them
    instead of scoring the split again."""
    import numpy as np

    np.savez(Path(directory) / VAL_SCORES_FILE, labels=np.asarray(labels), logits=np.asarray(logits))


def read_val_scores(directory: str | Path) -> tuple[Any, Any] | None:
    """(labels, raw logits) saved with the checkpoint, or None when it has none (or they cannot be read)."""
    import numpy as np

    path = Path(directory) / VAL_SCORES_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path) as saved:
            return saved["labels"].astype(int), saved["logits"].astype(np.float64)
    except (OSError, KeyError, ValueError):
        return None


def load_checkpoint(directory: str | Path, device: str = "cpu") -> LoadedModel:
    """Rebuild the Detector from a checkpoint directory, in eval mode on `device`.

    The backbone is rebuilt without pretrained weights: the state_dict replaces them all, and the
    file the run started from need not exist where the checkpoint is served.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} is incomplete: {name} is missing")

    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        if int(config.get("format", CHECKPOINT_FORMAT)) > CHECKPOINT_FORMAT:
            raise ValueError(f"format {config['format']} is newer than this code reads ({CHECKPOINT_FORMAT})")
        model_cfg = _dataclass_from(ModelConfig, config["model"])
        preprocess = _dataclass_from(PreprocessSettings, config["preprocess"])
        threshold = float(config.get("threshold", 0.5))
        metrics = dict(config.get("metrics") or {})
        calibration = Calibration(**(config.get("calibration") or {}))
        operating_point = dict(config.get("operating_point") or {})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"checkpoint config {directory / CONFIG_FILE} is invalid: {err}") from err

    try:
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and torch errors all mean "unreadable"
        raise ValueError(f"checkpoint weights {directory / WEIGHTS_FILE} are unreadable: {err}") from err

    model = build_model(replace(model_cfg, pretrained_weights=None))
    problem = _misfit(model, state)
    if problem:
        raise ValueError(
            f"checkpoint weights {directory / WEIGHTS_FILE} do not match its config (backbone "
            f"{model_cfg.backbone!r}, saved with timm {config.get('timm_version')}, running timm "
            f"{timm.__version__}): {problem}"
        )
    model.load_state_dict(state)
    model.calibrate.set(calibration)
    if config.get("residual_verdict") is not None:
        _set_residual_verdict(model, config["residual_verdict"], directory)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        model_cfg=model_cfg,
        preprocess=preprocess,
        threshold=threshold,
        metrics=metrics,
        calibration=calibration,
        operating_point=operating_point,
    )


def set_operating_point(directory: str | Path, point: OperatingPoint) -> None:
    """Write a fitted operating point (calibration and threshold) into a checkpoint's config.json, atomically."""
    _update_config(
        Path(directory),
        {
            "threshold": float(point.threshold),
            "calibration": point.calibration.to_dict(),
            "operating_point": point.tags(),
        },
    )


def set_residual_verdict(directory: str | Path, values: dict[str, Any]) -> None:
    """Write a fitted residual verdict (ResidualVerdict.set's values, and how it was fitted) into a checkpoint's
    config.json, atomically."""
    _update_config(Path(directory), {"residual_verdict": values})


def _update_config(directory: Path, entries: dict[str, Any]) -> None:
    """Set these entries of a checkpoint's config.json, the rest kept; the file replaced whole."""
    config = json.loads((directory / CONFIG_FILE).read_text())
    config.update(entries)
    _write_config(directory, config)


def _set_residual_verdict(model: Detector, values: Any, directory: Path) -> None:
    """A checkpoint's residual verdict into its model, refused in one line where the model cannot hold it."""
    if model.residual_verdict is None:
        raise ValueError(
            f"checkpoint config {directory / CONFIG_FILE} has a residual verdict, but its model has no residual "
            "statistics to read (model.residual_verdict false, or neither source_spectrum nor source_phase)"
        )
    try:
        model.residual_verdict.set(values)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"checkpoint config {directory / CONFIG_FILE} has an invalid residual verdict: {err}") from err


def set_source_head(directory: str | Path, weight: torch.Tensor, bias: torch.Tensor, fit: dict[str, Any]) -> None:
    """Replace a checkpoint's source head by a fitted one (training.source_head) and say how it was fitted in its
    config.json. Each file is replaced whole (written beside it, then renamed), the weights first."""
    directory = Path(directory)
    state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    if tuple(state["source_head.weight"].shape) != tuple(weight.shape):
        raise ValueError(f"a source head of shape {tuple(weight.shape)} does not fit {directory}")
    state["source_head.weight"] = weight.detach().to(state["source_head.weight"].dtype).cpu()
    state["source_head.bias"] = bias.detach().to(state["source_head.bias"].dtype).cpu()
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(directory / WEIGHTS_FILE)
    _update_config(directory, {"source_head": fit})


def _create_backbone(name: str) -> nn.Module:
    if not timm.is_model(name):
        raise ValueError(f"unknown timm backbone {name!r} (see timm.list_models())")
    return timm.create_model(name, pretrained=False, num_classes=0)


def _hub_backbone(name: str, weights: str) -> nn.Module:
    """timm's pretrained weights for `name`, refused in one line (not a minute of retries) when offline."""
    if not timm.is_model(name):
        raise ValueError(f"unknown timm backbone {name!r} (see timm.list_models())")
    available = timm.list_pretrained(name)
    tag = weights.partition(":")[2]
    full_name = f"{name}.{tag}" if tag else name
    if not available:
        raise ValueError(f"timm has no pretrained weights for backbone {name!r}; run without pretrained weights")
    if tag and full_name not in available:
        raise ValueError(f"timm has no pretrained tag {tag!r} for {name!r}; known: {', '.join(available[:6])}")
    unreachable = _hub_unreachable()
    if unreachable is None:
        try:
            return timm.create_model(full_name, pretrained=True, num_classes=0)
        except Exception as err:  # noqa: BLE001 - network, hub and cache errors all mean "unavailable"
            unreachable = f"{type(err).__name__}: {_first_line(err)}"
    raise WeightsUnavailableError(
        f"pretrained weights {full_name!r} cannot be fetched from the hub ({unreachable}); pass a local "
        f"weights file as pretrained_weights (a timm {name!r} state_dict), or run without pretrained weights"
    )


def _hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached, or None; a quick TCP probe instead of the client's
    retries (about a minute without network). Offline mode and proxies are left to the hub client."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or urllib.request.getproxies():
        return None
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        return f"{constants.ENDPOINT} is unreachable: {err}"
    return None


def _load_backbone_file(backbone: nn.Module, name: str, path: Path) -> None:
    """Load a timm backbone state_dict; classifier keys are ignored, every other key must fit exactly."""
    if not path.is_file():
        raise WeightsUnavailableError(
            f"pretrained weights file not found: {path}; pass an existing local file "
            f"(a timm {name!r} state_dict) as pretrained_weights, or run without pretrained weights"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - safetensors, pickle and zip errors all mean "unreadable"
        raise ValueError(f"pretrained weights file {path} is unreadable: {_first_line(err)}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained weights file {path} does not hold a state_dict")

    classifier = backbone.pretrained_cfg.get("classifier") or "classifier"
    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if not k.startswith(tuple(p + "." for p in prefixes))}
    problem = _misfit(backbone, state)
    if problem:
        raise ValueError(f"pretrained weights file {path} does not fit backbone {name!r}: {problem}")
    backbone.load_state_dict(state, strict=True)


def _misfit(module: nn.Module, state: dict[str, Any]) -> str | None:
    """Why `state` cannot load strictly into `module`, in one line; None when it fits."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(getattr(state[k], 'shape', ()))} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    return "; ".join(parts) or None


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _dataclass_from(cls: type, values: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}")
    return cls(**values)


def _json_scalar(value: Any) -> Any:
    """numpy and torch scalars in metrics become plain JSON numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"metric value of type {type(value).__name__} is not JSON-serialisable")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__
