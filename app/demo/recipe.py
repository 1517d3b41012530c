"""The demo dataset's recipe: the numbers a build follows, shared by the planner (build.py) and the worker processes
(worker.py) without either importing the other.

Changing any of them changes the bytes a build writes, so RECIPE_VERSION goes up with them (a cached build of an
older recipe is then rebuilt).
"""

from __future__ import annotations

RECIPE_VERSION = 4
LABELS = ("real", "ai_generated")
SPLIT_FRACTIONS = {"train": 0.60, "val": 0.20, "test": 0.20}
JPEG_QUALITY = (80, 95)  # both classes, drawn once per pair
SOFTEN_PROB = 0.22  # share of reals softened after capture (blur sigma below)
SOFTEN_SIGMA = (0.5, 1.3)
FAKE_WHITE_NOISE_PROB = 0.2  # share of fakes whose noise is plain white noise instead of decoder-shaped
DECODER_WEIGHTS = {"autoencoder": 0.4, "transposed_conv": 0.2, "nearest_conv": 0.2, "bilinear_conv": 0.2}
DECODER_TRAIN_SCENES = 128
DECODER_HOLDOUT_SCENES = 16
DECODER_STEPS = 200
CHUNK = 24

# Independent random streams of one seed: the split, each scene of the dataset, the decoders' fitting scenes.
STREAM_SPLIT, STREAM_DATASET, STREAM_DECODER_TRAIN = 0, 1, 2
