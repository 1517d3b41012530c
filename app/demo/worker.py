"""The units of work of a build, as top-level functions a spawned process can run.

Each takes plain data and returns plain data, so the same call gives the same bytes in a worker process or in
the caller's own process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.demo import recipe
from app.demo.camera import CameraSettings, blur_per_image, capture, sample_camera
from app.demo.decoders import Decoder, fit_decoder, regenerate
from app.demo.matching import hf_energy, match_to_twin, noise_level
from app.demo.scenes import render_scene


def init_worker() -> None:
    torch.set_num_threads(1)


def enter_inline() -> int:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    return previous


def exit_inline(previous: int) -> None:
    torch.set_num_threads(previous)


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def render_decoder_training(args: tuple[int, int, int, int]) -> np.ndarray:
    """Noise-free camera images for fitting the decoders.

    These scenes are not part of the dataset. The fitting scenes use training photos only; the held-out ones
    (the last few) use validation photos, so the fidelity check is on content the decoders never saw.
    """
    seed, size, start, stop = args
    scenes, settings = [], []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, recipe.STREAM_DECODER_TRAIN, i])
        split = "train" if i < recipe.DECODER_TRAIN_SCENES else "val"
        scenes.append(render_scene(rng, split, 2 * size).image)
        settings.append(sample_camera(rng, denoise_prob=0.0))
    with torch.no_grad():
        return capture(_to_tensor(scenes), settings, torch.zeros(len(scenes), 1, size, size)).numpy()


def fit(args: tuple[str, np.ndarray, int, int, int]) -> tuple[dict, float, float]:
    kind, images, n_train, seed, steps = args
    images_t = torch.from_numpy(images)
    kind_seed = seed * 1000 + sorted(recipe.DECODER_WEIGHTS).index(kind)
    fitted = fit_decoder(kind, images_t[:n_train], images_t[n_train:], seed=kind_seed, steps=steps)
    return fitted.model.state_dict(), fitted.psnr_db, fitted.seconds


def _load_decoders(states: dict[str, dict]) -> dict[str, Decoder]:
    out = {}
    for kind, state in states.items():
        model = Decoder(kind)
        model.load_state_dict(state)
        out[kind] = model.eval()
    return out


def _save_jpeg(image: torch.Tensor, path: Path, quality: int) -> None:
    arr = (image.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, format="JPEG", quality=quality, subsampling=2, optimize=False)


def render_pairs(args: tuple[int, int, str, list, dict[str, dict]]) -> list[dict]:
    """Render a chunk of scenes through the camera and through a decoder; write both JPEGs; return manifest rows."""
    seed, size, out_dir, plans, decoder_states = args
    decoders = _load_decoders(decoder_states)
    kinds = list(recipe.DECODER_WEIGHTS)
    weights = np.array([recipe.DECODER_WEIGHTS[k] for k in kinds])
    scenes, settings, cam_noise, draws = [], [], [], []
    for p in plans:
        rng = np.random.default_rng([seed, recipe.STREAM_DATASET, p.index])
        scene = render_scene(rng, p.split, 2 * size)
        settings.append(sample_camera(rng))
        cam_noise.append(rng.standard_normal((1, size, size), dtype=np.float32))
        soften = rng.random() < recipe.SOFTEN_PROB
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        draws.append(
            {
                "scene": scene,
                "soften_sigma": float(rng.uniform(*recipe.SOFTEN_SIGMA)) if soften else 0.0,
                "quality": int(rng.integers(recipe.JPEG_QUALITY[0], recipe.JPEG_QUALITY[1] + 1)),
                "kind": kind,
                "decoder_noise": rng.standard_normal((1, size, size), dtype=np.float32),
                "white_noise": rng.standard_normal((3, size, size), dtype=np.float32)
                if rng.random() < recipe.FAKE_WHITE_NOISE_PROB
                else None,
            }
        )
        scenes.append(scene.image)
    with torch.no_grad():
        x = _to_tensor(scenes)
        noise = torch.from_numpy(np.stack(cam_noise))
        cams = capture(x, settings, noise)
        noise_free = capture(x, settings, torch.zeros_like(noise))
        reals = blur_per_image(cams, [d["soften_sigma"] for d in draws]).clamp(0, 1)
        fakes = _regenerate_all(noise_free, reals, draws, decoders)

    rows = []
    for i, (p, d, cam) in enumerate(zip(plans, draws, settings, strict=True)):
        scene_id = f"{seed}-{p.index:05d}"
        source = "+".join(d["scene"].sources)
        for label, image in (("real", reals[i]), ("ai_generated", fakes[i])):
            rel = f"{p.split}/{label}/{scene_id}.jpg"
            _save_jpeg(image, Path(out_dir) / rel, d["quality"])
            rows.append(
                {
                    "path": rel,
                    "label": label,
                    "split": p.split,
                    "scene_id": scene_id,
                    "source": source,
                    "generator": "camera" if label == "real" else d["kind"],
                    "hard_case": _hard_case(label, d, cam),
                    "jpeg_quality": d["quality"],
                }
            )
    return rows


def _regenerate_all(
    noise_free: torch.Tensor, reals: torch.Tensor, draws: list[dict], decoders: dict[str, Decoder]
) -> torch.Tensor:
    clean = torch.empty_like(noise_free)
    field = torch.empty_like(noise_free)
    for kind, model in decoders.items():
        idx = [i for i, d in enumerate(draws) if d["kind"] == kind]
        if not idx:
            continue
        noise = torch.from_numpy(np.stack([draws[i]["decoder_noise"] for i in idx]))
        clean[idx], field[idx] = regenerate(model, noise_free[idx], noise)
    for i, d in enumerate(draws):
        if d["white_noise"] is not None:
            white = torch.from_numpy(d["white_noise"])
            field[i] = white / white.std() * 0.01
    return match_to_twin(clean, field, hf_energy(reals), noise_level(reals))


def _hard_case(label: str, draw: dict, cam: CameraSettings) -> str:
    if label == "real":
        cases = (["denoised"] if cam.denoise > 0 else []) + (["softened"] if draw["soften_sigma"] > 0 else [])
        return "+".join(cases)
    return "added_noise" if draw["white_noise"] is not None else ""
