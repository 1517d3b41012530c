import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from app.degradations import Blur, DegradationConfig, Downscale, Jpeg, PhotoChain
from app.transforms import AugmentConfig, eval_preprocess, to_model_input, train_augment


def augment(flip_prob: float = 0.0, **degradations: object) -> AugmentConfig:
    """Only the degradations named, at the probabilities given."""
    none = {"blur_prob": 0.0, "downscale_prob": 0.0, "jpeg_prob": 0.0}
    return AugmentConfig(degradations=DegradationConfig(**{**none, **degradations}), flip_prob=flip_prob)


NO_AUG = augment()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _find_window(source: np.ndarray, crop: np.ndarray) -> tuple[int, int] | None:
    """Where `crop` sits in `source` pixel for pixel, or None."""
    size = crop.shape[0]
    corners = source[: source.shape[0] - size + 1, : source.shape[1] - size + 1]
    candidates = np.argwhere((corners == crop[0, 0]).all(-1))
    for top, left in candidates:
        if np.array_equal(source[top : top + size, left : left + size], crop):
            return int(top), int(left)
    return None


@pytest.mark.parametrize("size", [(200, 150), (64, 64), (65, 300)])
def test_eval_preprocess_is_a_native_center_crop(size):
    image = _noise(*size)
    out = eval_preprocess(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    left, top = (size[0] - 64) // 2, (size[1] - 64) // 2
    assert np.array_equal(out, np.asarray(image)[top : top + 64, left : left + 64])


def test_eval_preprocess_upscales_only_a_small_image():
    out = eval_preprocess(Image.new("RGB", (20, 40), (10, 200, 30)), 64)
    assert out.shape == (64, 64, 3)
    assert np.allclose(out, (10, 200, 30), atol=1)


def test_eval_preprocess_accepts_non_rgb():
    assert eval_preprocess(Image.new("L", (80, 80), 7), 64).shape == (64, 64, 3)


def test_train_augment_shape_dtype_and_determinism():
    image = _noise(300, 200)
    aug = augment(flip_prob=0.5, blur_prob=0.5, downscale_prob=0.5, jpeg_prob=0.5)
    first = [train_augment(image, 96, aug, np.random.default_rng(3)) for _ in range(2)]
    assert first[0].shape == (96, 96, 3) and first[0].dtype == np.uint8
    assert np.array_equal(first[0], first[1])
    rng = np.random.default_rng(3)
    outs = [train_augment(image, 96, aug, rng) for _ in range(4)]
    assert any(not np.array_equal(outs[0], other) for other in outs[1:])


def test_train_crop_is_a_window_of_the_source_at_native_resolution():
    source = np.asarray(_noise(90, 70))
    rng = np.random.default_rng(0)
    positions = set()
    for _ in range(6):
        crop = train_augment(Image.fromarray(source), 48, NO_AUG, rng)
        window = _find_window(source, crop)
        assert window is not None
        positions.add(window)
    assert len(positions) > 1  # crops move around


def test_flip_prob_one_mirrors_the_crop():
    image = _noise(100, 80)
    flip = augment(flip_prob=1.0)
    flipped = train_augment(image, 48, flip, np.random.default_rng(5))
    plain = train_augment(image, 48, NO_AUG, np.random.default_rng(5))  # same draws, same position
    assert np.array_equal(flipped, plain[:, ::-1])


def test_train_augment_upscales_only_a_small_image():
    out = train_augment(Image.new("RGB", (30, 50), (1, 2, 3)), 64, NO_AUG, np.random.default_rng(0))
    assert out.shape == (64, 64, 3)
    assert np.allclose(out, (1, 2, 3), atol=1)


def _high_frequency(crop: np.ndarray) -> float:
    grey = crop.astype(np.float32).mean(axis=2)
    return float(np.abs(np.diff(grey, axis=1)).mean())


BLUR_ONLY = augment(blur_prob=1.0, blur_sigma=(1.5, 2.0))
JPEG_ONLY = augment(jpeg_prob=1.0, jpeg_quality=(40, 50))
DOWNSCALE_ONLY = augment(downscale_prob=1.0, downscale_factor=(0.5, 0.5), upscale_back_prob=0.0)


@pytest.mark.parametrize("aug", [BLUR_ONLY, JPEG_ONLY, DOWNSCALE_ONLY], ids=["blur", "jpeg", "downscale"])
def test_each_degradation_is_applied_at_prob_one(aug):
    image = _noise(160, 120)
    changed = train_augment(image, 64, aug, np.random.default_rng(1))
    plain = train_augment(image, 64, NO_AUG, np.random.default_rng(1))  # same draws, same position
    assert _find_window(np.asarray(image), changed) is None
    assert np.abs(changed.astype(int) - plain.astype(int)).mean() > 5


def test_blur_removes_high_frequencies():
    image = _noise(160, 120)
    blurred = train_augment(image, 64, BLUR_ONLY, np.random.default_rng(1))
    plain = train_augment(image, 64, NO_AUG, np.random.default_rng(1))
    assert _high_frequency(blurred) < 0.5 * _high_frequency(plain)


def test_jpeg_leaves_8x8_block_artifacts():
    smooth = Image.fromarray(np.tile(np.linspace(0, 255, 160, dtype=np.uint8), (120, 1))).convert("RGB")
    image = Image.blend(smooth, _noise(160, 120), 0.3)
    out = train_augment(image, 64, JPEG_ONLY, np.random.default_rng(4)).astype(np.float32).mean(axis=2)
    steps = np.abs(np.diff(out, axis=1)).mean(axis=0)  # 63 column boundaries
    phase_energy = [steps[phase::8].mean() for phase in range(8)]
    assert max(phase_energy) > 1.2 * float(np.median(phase_energy))  # block edges stand out


def test_blur_matches_blurring_the_whole_image():
    # the context window must make the crop identical to blurring the full photo first
    image = _noise(200, 160)
    aug = augment(blur_prob=1.0, blur_sigma=(2.0, 2.0))
    whole = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=2.0)))
    for seed in range(3):
        crop = train_augment(image, 64, aug, np.random.default_rng(seed))
        assert _find_window(whole, crop) is not None


def test_probabilities_zero_leave_pixels_untouched():
    image = _noise(120, 100)
    for seed in range(5):
        crop = train_augment(image, 64, NO_AUG, np.random.default_rng(seed))
        assert _find_window(np.asarray(image), crop) is not None


def test_to_model_input_layout_and_range():
    batch = np.zeros((2, 8, 6, 3), dtype=np.uint8)
    batch[0, 1, 2] = (255, 128, 0)
    out = to_model_input(batch)
    assert out.shape == (2, 3, 8, 6) and out.dtype == torch.float32
    assert out.is_contiguous()
    assert torch.allclose(out[0, :, 1, 2], torch.tensor([1.0, 128 / 255, 0.0]))
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_to_model_input_accepts_tensors_devices_and_channels_last():
    batch = torch.randint(0, 256, (3, 5, 4, 3), dtype=torch.uint8)
    out = to_model_input(batch, device="cpu", channels_last=True)
    assert out.shape == (3, 3, 5, 4)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, batch.permute(0, 3, 1, 2).float() / 255)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((8, 8, 3), dtype=np.uint8),
        np.zeros((1, 8, 8, 3), dtype=np.float32),
        np.zeros((1, 3, 8, 8), dtype=np.uint8),
    ],
    ids=["no_batch_dim", "float", "nchw"],
)
def test_to_model_input_refuses_other_layouts(bad):
    with pytest.raises(ValueError):
        to_model_input(bad)


def test_jpeg_matches_recompressing_the_whole_image():
    # the context window starts on the MCU grid, so block boundaries fall where whole-image JPEG puts them
    image = _noise(400, 300, seed=9)
    aug = augment(jpeg_prob=1.0, jpeg_quality=(60, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=60)
    whole = np.asarray(Image.open(buffer).convert("RGB"))
    for seed in range(3):
        crop = train_augment(image, 96, aug, np.random.default_rng(seed))
        assert _find_window(whole, crop) is not None


def test_a_downscale_gives_a_crop_of_the_smaller_photo_at_its_own_resolution():
    # the window around the crop is as wide as the crop's context before the photo shrinks, so the crop is a
    # window of the whole photo downscaled (the resampling filter sees the same pixels)
    image = _noise(600, 480, seed=3)
    small = np.asarray(image.resize((300, 240), Image.Resampling.BICUBIC))
    found = 0
    for seed in range(4):
        crop = train_augment(image, 64, DOWNSCALE_ONLY, np.random.default_rng(seed))
        assert crop.shape == (64, 64, 3)
        inner = crop[4:-4, 4:-4]  # a pixel of rounding in the window's placement moves the filter's phase at most
        found += any(
            np.abs(small[t : t + 56, x : x + 56].astype(int) - inner.astype(int)).max() <= 2
            for t in range(0, 240 - 56)
            for x in range(0, 300 - 56)
            if abs(int(small[t, x, 0]) - int(inner[0, 0, 0])) <= 2
        )
    assert found >= 3


def test_every_image_draws_the_same_random_numbers():
    # the crop of a photo with no degradation fired is where it would be with every one of them off
    image = _noise(90, 70)
    heavy = augment(blur_prob=0.3, downscale_prob=0.3, jpeg_prob=0.3)
    for seed in range(20):
        crop = train_augment(image, 48, heavy, np.random.default_rng(seed))
        plain = train_augment(image, 48, NO_AUG, np.random.default_rng(seed))
        unchanged = _find_window(np.asarray(image), crop)
        if unchanged is not None:
            assert np.array_equal(crop, plain)


# ------------------------------------------------------------------------ the same augmentation on a decoded tensor
def _smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like scene (gradients and grain): the filters of the two backends round alike on it."""
    from tests.app.test_pixels import photo

    return photo(width, height, seed)


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize(
    "step",
    [Blur(0.5), Blur(1.5), Downscale(0.5), Downscale(0.43, upscale_back=True), Jpeg(30), Jpeg(90)],
    ids=str,
)
def test_each_degradation_does_the_same_to_a_tensor(step) -> None:
    """One definition, two backends: Pillow's filters and torch's (which run on the GPU) within one grey level on
    average; JPEG through libjpeg-turbo on both sides here (nvJPEG on a GPU) gives the same pixels."""
    image = _smooth(203, 151, seed=2)
    on_pillow = np.asarray(step(image), dtype=float)
    on_tensor = step.tensor(_as_tensor(image)).permute(1, 2, 0).numpy().astype(float)
    assert on_tensor.shape == on_pillow.shape
    assert np.abs(on_tensor - on_pillow).mean() <= 1.0


@pytest.mark.parametrize("size", [(300, 220), (70, 90)], ids=["large", "smaller than the crop"])
def test_the_tensor_augmentation_draws_and_crops_like_pillows(size) -> None:
    """Same rng, same draws: the same degradations fire, the crop lands on the same pixels and flips alike."""
    from app.transforms import train_augment_degraded, train_augment_tensor

    image = _smooth(*size, seed=4)
    aug = AugmentConfig(degradations=DegradationConfig(blur_prob=0.5, downscale_prob=0.5, jpeg_prob=0.5))
    for seed in range(12):
        expected, fired = train_augment_degraded(image, 64, aug, np.random.default_rng(seed))
        crop, degraded = train_augment_tensor(_as_tensor(image), 64, aug, np.random.default_rng(seed))
        assert crop.shape == (64, 64, 3) and crop.dtype == torch.uint8
        assert degraded == fired, seed
        assert np.abs(crop.numpy().astype(float) - expected).mean() <= 1.5, seed
    plain, _ = train_augment_tensor(_as_tensor(image), 64, NO_AUG, np.random.default_rng(0))
    if min(size) >= 64:
        assert _find_window(np.asarray(image), plain.numpy()) is not None, "undegraded: a window at native size"


def test_a_photo_chain_is_the_same_for_the_same_photo_and_differs_between_photos() -> None:
    """The residual verdict's fit degrades each photo once: the same chain in every run (whichever worker reads the
    photo), a different one from photo to photo, and picklable into Ray Data's workers."""
    import pickle

    change = PhotoChain(DegradationConfig(blur_prob=0.5, downscale_prob=0.5, jpeg_prob=0.5), seed=0)
    again = pickle.loads(pickle.dumps(change))
    assert again == change
    chains = set()
    for seed in range(20):
        image = _noise(96, 80, seed=seed)
        chain = change.chain(image)
        assert change.chain(image.copy()) == again.chain(image) == chain
        assert np.array_equal(np.asarray(change(image)), np.asarray(chain(image)))
        chains.add(chain)
    assert len(chains) >= 2, "every photo got the same chain"
