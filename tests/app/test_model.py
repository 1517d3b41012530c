import json
import socket
import warnings
from dataclasses import replace
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch

from app.model import (
    STEM_SCALE,
    Detector,
    ForensicStem,
    LoadedModel,
    ModelConfig,
    PreprocessSettings,
    WeightsUnavailableError,
    build_model,
    load_checkpoint,
    save_checkpoint,
)

torch.set_num_threads(2)

SMALL = "mobilenetv3_small_050"
BACKBONES = ["efficientnet_b0", "resnet18", SMALL]


def _batch(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def default_model() -> Detector:
    torch.manual_seed(0)
    return build_model(ModelConfig()).eval()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_logits_have_shape_batch(backbone, default_model):
    model = default_model if backbone == "efficientnet_b0" else build_model(ModelConfig(backbone=backbone)).eval()
    with torch.no_grad():
        logits = model(_batch(3))
    assert logits.shape == (3,)
    assert torch.isfinite(logits).all()


def test_default_is_efficientnet_b0_with_head_1280_512_1(default_model):
    assert default_model.backbone.default_cfg["architecture"] == "efficientnet_b0"
    assert isinstance(default_model.stem, ForensicStem)
    linears = [m for m in default_model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1280, 512), (512, 1)]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in default_model.head)


def test_stem_is_fixed_and_kills_flat_content():
    model = build_model(ModelConfig(backbone=SMALL))
    assert isinstance(model.stem, ForensicStem)
    assert list(model.stem.parameters()) == []
    flat = torch.full((2, 3, 32, 32), 0.7)
    assert torch.allclose(model.stem(flat), torch.zeros_like(flat), atol=1e-5)
    gradient = torch.linspace(0, 1, 32).expand(1, 3, 32, 32).contiguous()  # linear ramp: zero inside
    assert torch.allclose(model.stem(gradient)[..., 1:-1, 1:-1], torch.zeros(1, 3, 30, 30), atol=1e-5)


def test_stem_is_image_minus_local_mean_times_scale():
    x = _batch(1, 16)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    expected = (x - torch.nn.functional.avg_pool2d(padded, 3, stride=1)) * STEM_SCALE
    assert torch.allclose(ForensicStem()(x), expected, atol=1e-5)


def test_stem_survives_training_steps():
    model = build_model(ModelConfig(backbone=SMALL))
    kernel = model.stem.kernel.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(_batch(2, size=32)).sum()
    loss.backward()
    optimizer.step()
    assert torch.equal(model.stem.kernel, kernel)


def test_stem_off_means_imagenet_normalisation():
    model = build_model(ModelConfig(backbone=SMALL, forensic_stem=False)).eval()
    assert not isinstance(model.stem, ForensicStem)
    grey = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert torch.allclose(model.stem(grey), torch.zeros(1, 3, 4, 4), atol=1e-6)
    with torch.no_grad():
        assert model(_batch(2)).shape == (2,)


@pytest.mark.parametrize("stem", [True, False], ids=["stem", "imagenet_norm"])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path, stem):
    cfg = ModelConfig(backbone=SMALL, hidden=32, dropout=0.1, forensic_stem=stem)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    x = _batch(2)
    with torch.no_grad():
        expected = model(x)
    metrics = {"auroc": torch.tensor(0.91), "f1": 0.8}
    save_checkpoint(tmp_path / "ckpt", model, cfg, PreprocessSettings(crop_size=96), threshold=0.42, metrics=metrics)

    loaded = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded, LoadedModel)
    assert loaded.model_cfg == cfg
    assert loaded.preprocess == PreprocessSettings(crop_size=96)
    assert loaded.threshold == pytest.approx(0.42)
    assert loaded.metrics == {"auroc": pytest.approx(0.91), "f1": 0.8}
    assert not loaded.model.training
    with torch.no_grad():
        assert torch.equal(loaded.model(x), expected)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["timm_version"] == timm.__version__


def test_checkpoint_of_a_wrapped_model_loads(tmp_path: Path):
    cfg = ModelConfig(backbone=SMALL, hidden=16)
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path, torch.nn.DataParallel(model), cfg, PreprocessSettings())
    loaded = load_checkpoint(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.model(_batch(1)), model(_batch(1)))


def test_checkpoint_does_not_need_the_pretrained_file(tmp_path: Path):
    weights = tmp_path / "backbone.pth"
    torch.save(timm.create_model(SMALL, num_classes=0).state_dict(), weights)
    cfg = ModelConfig(backbone=SMALL, hidden=16, pretrained_weights=str(weights))
    save_checkpoint(tmp_path / "ckpt", build_model(cfg), cfg, PreprocessSettings())
    weights.unlink()
    assert load_checkpoint(tmp_path / "ckpt").model_cfg.pretrained_weights == str(weights)


def test_pretrained_backbone_file_is_loaded_and_classifier_ignored(tmp_path: Path):
    torch.manual_seed(5)
    source = timm.create_model(SMALL, num_classes=1000)  # with a classifier, as timm ships them
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig(backbone=SMALL, pretrained_weights=str(path)))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_pretrained_safetensors_file(tmp_path: Path):
    from safetensors.torch import save_file

    torch.manual_seed(6)
    source = timm.create_model(SMALL, num_classes=0)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = build_model(ModelConfig(backbone=SMALL, pretrained_weights=str(path)))
    assert torch.equal(model.backbone.conv_stem.weight, source.conv_stem.weight)


def test_pretrained_file_of_another_backbone_is_refused(tmp_path: Path):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit backbone"):
        build_model(ModelConfig(backbone=SMALL, pretrained_weights=str(path)))


def test_missing_weights_file_says_how_to_fix(tmp_path: Path):
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(ModelConfig(backbone=SMALL, pretrained_weights=str(tmp_path / "nope.pth")))
    message = str(info.value)
    assert "\n" not in message
    assert "nope.pth" in message and "local file" in message and "without pretrained weights" in message


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path: Path):
    """A hub endpoint on a closed local port and an empty cache: offline, and nothing can be downloaded."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_hub_weights_offline_fail_fast_with_one_line(unreachable_hub):
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(ModelConfig(backbone=SMALL, pretrained_weights="hub"))
    message = str(info.value)
    assert "\n" not in message
    assert "unreachable" in message and "local" in message and "without pretrained weights" in message


def test_unknown_hub_tag_and_backbone_are_usage_errors():
    with pytest.raises(ValueError, match="no pretrained tag"):
        build_model(ModelConfig(backbone=SMALL, pretrained_weights="hub:no_such_tag"))
    with pytest.raises(ValueError, match="unknown timm backbone"):
        build_model(ModelConfig(backbone="no_such_backbone"))


def test_load_checkpoint_missing_directory(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_checkpoint(tmp_path / "absent")


def test_load_checkpoint_incomplete_or_broken(tmp_path: Path):
    cfg = ModelConfig(backbone=SMALL, hidden=16)
    directory = save_checkpoint(tmp_path / "ckpt", build_model(cfg), cfg, PreprocessSettings())

    (directory / "model.pt").rename(directory / "elsewhere.pt")
    with pytest.raises(FileNotFoundError, match="model.pt is missing"):
        load_checkpoint(directory)

    (directory / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(directory)

    (directory / "elsewhere.pt").replace(directory / "model.pt")
    (directory / "config.json").write_text("{broken json")
    with pytest.raises(ValueError, match="config.json is invalid"):
        load_checkpoint(directory)


def test_load_checkpoint_weights_that_do_not_match_config(tmp_path: Path):
    cfg = ModelConfig(backbone=SMALL, hidden=16)
    directory = save_checkpoint(tmp_path, build_model(cfg), cfg, PreprocessSettings())
    config = json.loads((directory / "config.json").read_text())
    config["model"] = {**config["model"], "hidden": 32}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match its config"):
        load_checkpoint(directory)


def test_model_config_is_plain_data():
    cfg = replace(ModelConfig(), backbone=SMALL)
    assert cfg.backbone == SMALL and cfg.hidden == 512 and cfg.forensic_stem and cfg.pretrained_weights is None


FAMILIES = ["none", "autoencoder", "bilinear_conv"]


def test_the_source_head_gives_one_logit_per_family_beside_the_same_verdict(tmp_path: Path):
    from app.model import AllLogits, source_probabilities

    cfg = ModelConfig(backbone=SMALL, hidden=16, source_families=FAMILIES, source_spectrum=8)
    torch.manual_seed(2)
    model = build_model(cfg).eval()
    assert model.source_head.in_features == model.head[0].in_features + 8 * 8, "the features and the spectrum"
    x = _batch(3)
    with torch.no_grad():
        verdict = model(x)
        logit, sources = model(x, with_sources=True)
        both = AllLogits(model)(x)
    assert sources.shape == (3, len(FAMILIES))
    assert torch.equal(logit, verdict) and torch.equal(both[:, 0], verdict) and torch.equal(both[:, 1:], sources)
    probabilities = source_probabilities(both[:, 1:].numpy())
    assert probabilities.shape == (3, len(FAMILIES)) and probabilities.sum(axis=1) == pytest.approx([1.0] * 3)

    save_checkpoint(tmp_path / "ckpt", model, cfg, PreprocessSettings(crop_size=64))
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.model_cfg.source_families == FAMILIES
    with torch.no_grad():
        assert torch.equal(AllLogits(loaded.model)(x), both)


def test_a_model_without_the_source_head_has_a_verdict_column_only(tmp_path: Path):
    from app.model import AllLogits

    cfg = ModelConfig(backbone=SMALL, hidden=16)
    model = build_model(cfg).eval()
    with torch.no_grad():
        assert AllLogits(model)(_batch(2)).shape == (2, 1)
    save_checkpoint(tmp_path, model, cfg, PreprocessSettings())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model"]["source_families"]  # a checkpoint saved before the head existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(tmp_path).model_cfg.source_families == []


def test_a_normalised_stem_sees_the_residuals_pattern_not_its_energy():
    stem = ForensicStem(normalize=True)
    x = _batch(2, seed=3)
    soft = 0.5 + 0.05 * (x - 0.5)  # the same pattern at a twentieth of the contrast, as a strong blur leaves it
    assert torch.allclose(stem(soft), stem(x), rtol=0.01, atol=0.01)  # the floor moves it a little
    assert stem(x).pow(2).mean(dim=(1, 2, 3)) == pytest.approx([1.0, 1.0], abs=1e-4)
    assert stem(torch.full((1, 3, 16, 16), 0.5)).abs().max() < 1e-3, "a flat photo's rounding noise stays small"


def test_the_residual_spectrum_tells_upsampling_from_camera_noise_whatever_the_contrast():
    """What the source head reads beside the features: a nearest-neighbour 2x upsampling leaves its mark at half the
    sampling rate (the spectrum's edge), plain noise does not; scaling the contrast changes nothing (log power,
    standardised per photo), and a bf16 copy of the model gives the float32 answer (the spectrum stays float32)."""
    from app.model import ResidualSpectrum

    spectrum = ResidualSpectrum(8).eval()
    noise = _batch(4, size=64, seed=5)
    upsampled = torch.nn.functional.interpolate(_batch(4, size=32, seed=6), scale_factor=2, mode="nearest")
    with torch.no_grad():
        plain, made = spectrum(noise), spectrum(upsampled)
        assert plain.shape == (4, 64)
        assert torch.allclose(spectrum(0.5 + 0.1 * (noise - 0.5)), plain, atol=1e-3)
        edge = lambda z: z.reshape(-1, 8, 8)[:, 0, :].mean(dim=1)  # the highest vertical frequencies  # noqa: E731
        assert (edge(made) < edge(plain) - 0.5).all(), (edge(made), edge(plain))
        half = ResidualSpectrum(8).eval().to(torch.bfloat16)
        assert torch.allclose(half(noise.to(torch.bfloat16)), plain, atol=0.05)


def test_the_phase_correlations_tell_a_copied_pixel_from_an_averaged_one():
    """A 2x nearest upsampling copies each pixel to its right neighbour inside a 2 x 2 cell and not across cells; the
    correlations at offset (0, 1) then differ between the cell's two columns, and they do not for camera-like noise.
    They are ratios to the residual's energy, so brightness and contrast leave them alone."""
    import torch.nn.functional as F

    from app.model import ResidualPhase

    phase = ResidualPhase(1)
    assert phase.width == 3 * 4 * len(phase.offsets) and (0, 1) in phase.offsets and (0, -1) not in phase.offsets
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(4, 3, 32, 32, generator=generator)
    copied = F.interpolate(coarse, scale_factor=2, mode="nearest")
    noise = torch.rand(4, 3, 64, 64, generator=generator)

    def right_neighbour(x: torch.Tensor) -> torch.Tensor:  # (N, C, 4 cell positions) at offset (0, 1)
        return phase(x).reshape(len(x), 3, 4, len(phase.offsets))[..., phase.offsets.index((0, 1))]

    inside, across = right_neighbour(copied)[..., 0], right_neighbour(copied)[..., 1]
    assert (inside - across).min() > 0.3, "a copied pixel correlates with its copy, not with the next cell"
    camera = right_neighbour(noise)
    assert (camera[..., 0] - camera[..., 1]).abs().max() < 0.1
    torch.testing.assert_close(phase(0.5 * copied + 0.25), phase(copied), atol=1e-4, rtol=1e-4)

    cfg = ModelConfig(backbone=SMALL, hidden=16, source_families=FAMILIES, source_spectrum=8, source_phase=2)
    model = build_model(cfg).eval()
    assert model.source_head.in_features == model.head[0].in_features + 8 * 8 + ResidualPhase(2).width
    with torch.no_grad():
        assert model(_batch(2), with_sources=True)[1].shape == (2, len(FAMILIES))


def _verdict_values(width: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(width, generator=generator, dtype=torch.float64) * 0.1).tolist()
    return {"head_scale": 0.7, "weight": weight, "bias": -0.3, "fit": "a summary set() ignores", "photos": 10}


def _verdict_cfg(**changes) -> ModelConfig:
    return replace(
        ModelConfig(backbone=SMALL, hidden=16, source_spectrum=8, source_phase=1, residual_verdict=True), **changes
    )


def test_an_inactive_residual_verdict_changes_nothing():
    """Training runs with the verdict unset: the same logits and the same state_dict as a model without it, so a
    checkpoint saved before it loads, and without a source head nothing trains the statistics' norm."""
    from app.model import AllLogits

    for families in ([], FAMILIES):
        torch.manual_seed(3)
        without = build_model(_verdict_cfg(residual_verdict=False, source_families=families)).eval()
        with_verdict = build_model(_verdict_cfg(source_families=families)).eval()
        assert with_verdict.residual_verdict is not None and not with_verdict.residual_verdict.active
        if not families:
            assert without.spectrum is None and without.phase is None and without.residual_verdict is None
            with_verdict.backbone.load_state_dict(without.backbone.state_dict())
            with_verdict.head.load_state_dict(without.head.state_dict())
            assert not any(p.requires_grad for p in with_verdict.spectrum.parameters())
        else:
            assert set(with_verdict.state_dict()) == set(without.state_dict())
            with_verdict.load_state_dict(without.state_dict())
        x = _batch(3, seed=4)
        with torch.no_grad():
            assert torch.equal(with_verdict(x), without(x))
            assert torch.equal(AllLogits(with_verdict)(x), AllLogits(without)(x))


def test_an_active_residual_verdict_blends_the_logit_with_the_statistics_before_calibration():
    from app.model import AllLogits
    from app.operating_point import Calibration

    torch.manual_seed(5)
    model = build_model(_verdict_cfg(source_families=FAMILIES)).eval()
    width = model.residual_statistics(_batch(1)).shape[1]
    assert model.residual_verdict.width == width == 8 * 8 + model.phase.width
    values = _verdict_values(width)
    model.residual_verdict.set(values)
    model.calibrate.set(Calibration(scale=1.5, bias=0.2))
    x = _batch(3, seed=6)
    with torch.no_grad():
        features = model.backbone(model.stem(x))
        statistics = model.residual_statistics(x)
        head = model.head(features).squeeze(1)
        weight = torch.tensor(values["weight"], dtype=torch.float32)
        expected = 1.5 * (0.7 * head + statistics @ weight - 0.3) + 0.2
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        logit, sources = model(x, with_sources=True)
        torch.testing.assert_close(logit, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sources, model.source_head(torch.cat([features, statistics], dim=1)))
        both = AllLogits(model)(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation
            traced = torch.jit.freeze(torch.jit.trace(AllLogits(model), x))  # what a CPU service runs
        torch.testing.assert_close(traced(x), both, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        model.residual_verdict.set({**values, "weight": values["weight"][:-1]})


def test_forward_computes_the_residual_statistics_once_for_the_verdict_and_the_source_head():
    from app.model import AllLogits

    model = build_model(_verdict_cfg(source_families=FAMILIES)).eval()
    calls = []
    original = model.spectrum.forward

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return original(x)

    model.spectrum.forward = counted
    x = _batch(2)
    with torch.no_grad():
        model(x)
        assert calls == [], "an inactive verdict and no source head asked for: no statistics"
        model.residual_verdict.set(_verdict_values(model.residual_verdict.width))
        AllLogits(model)(x)
        assert calls == [2]


def test_a_checkpoint_carries_its_residual_verdict_in_its_config(tmp_path: Path):
    from app.model import set_residual_verdict

    cfg = _verdict_cfg()
    torch.manual_seed(7)
    model = build_model(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", model, cfg, PreprocessSettings(crop_size=64))
    x = _batch(2, seed=8)

    unfitted = load_checkpoint(tmp_path / "ckpt").model
    assert not unfitted.residual_verdict.active, "a config.json without it: the network's logit alone"
    values = _verdict_values(model.residual_verdict.width, seed=1)
    set_residual_verdict(tmp_path / "ckpt", values)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["residual_verdict"] == values
    loaded = load_checkpoint(tmp_path / "ckpt").model
    assert loaded.residual_verdict.active
    model.residual_verdict.set(values)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert not torch.equal(unfitted(x), model(x))

    # a config.json whose model cannot hold the verdict it names
    plain_cfg = ModelConfig(backbone=SMALL, hidden=16)
    save_checkpoint(tmp_path / "plain", build_model(plain_cfg), plain_cfg, PreprocessSettings(crop_size=64))
    set_residual_verdict(tmp_path / "plain", values)
    with pytest.raises(ValueError, match="no residual statistics"):
        load_checkpoint(tmp_path / "plain")
    set_residual_verdict(tmp_path / "ckpt", {**values, "weight": values["weight"][:5]})
    with pytest.raises(ValueError, match="invalid residual verdict"):
        load_checkpoint(tmp_path / "ckpt")
