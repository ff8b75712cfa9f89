"""`tfbn_shapes`: a TFDS dataset generated locally, with a covariate-shifted twin.

Images are 32x32x3 drawings of one of four shapes (the label). The `source`
config draws bright, high-contrast shapes on a dark background; the `target`
config draws the same shapes with a colour cast, a brighter background, lower
contrast and more noise: the label rule is unchanged, the input distribution
is not (covariate shift, what fine-tuning BN statistics is for).

Nothing is downloaded: `download_and_prepare()` renders the images with a
fixed seed in a couple of seconds, so the dataset is identical everywhere.
It says so: one line, "Generating the embedded dataset ...", replaces TFDS's
"Downloading and preparing dataset" and its progress bars.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

IMAGE_SIZE = 32
SHAPES = ("square", "circle", "triangle", "cross")
SPLIT_SIZES = {"train": 2048, "test": 512}


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """The look of one domain.

    Attributes:
        background: `(low, high)` of the uniform background grey level.
        contrast: `(low, high)` of the foreground-minus-background level.
        colour_cast: Per-channel gain applied to the whole image.
        noise: Standard deviation of the additive Gaussian pixel noise.
        seed: Seed of the domain's random stream.
    """

    background: tuple = (0.0, 0.25)
    contrast: tuple = (0.55, 0.75)
    colour_cast: tuple = (1.0, 1.0, 1.0)
    noise: float = 0.03
    seed: int = 0


def shape_mask(shape: str, center_x: float, center_y: float, radius: float) -> np.ndarray:
    """Boolean `[IMAGE_SIZE, IMAGE_SIZE]` mask of one shape.

    Args:
        shape: One of `SHAPES`.
        center_x: Horizontal centre, in pixels.
        center_y: Vertical centre, in pixels.
        radius: Size of the shape, in pixels.

    Returns:
        The mask.

    Raises:
        ValueError: For an unknown shape.
    """
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    dx, dy = np.abs(x - center_x), np.abs(y - center_y)
    if shape == "square":
        return (dx <= 0.8 * radius) & (dy <= 0.8 * radius)
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "triangle":
        depth = y - (center_y - radius)
        return (depth >= 0) & (y <= center_y + 0.7 * radius) & (dx <= 0.6 * depth)
    if shape == "cross":
        arm = radius / 3.5
        return ((dx <= arm) & (dy <= radius)) | ((dy <= arm) & (dx <= radius))
    raise ValueError(f"`shape` must be one of {SHAPES}; received {shape!r}.")


def render(config: ShapesConfig, label: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 `[32, 32, 3]` image of shape `SHAPES[label]` in `config`'s domain.

    Args:
        config: The domain (background, contrast, colour cast, noise).
        label: The class, an index into `SHAPES`.
        rng: The random generator (position, size, colours, noise).

    Returns:
        The image.
    """
    center_x, center_y = rng.uniform(11, 21, size=2)
    radius = rng.uniform(6, 10)
    mask = shape_mask(SHAPES[label], center_x, center_y, radius)[..., None]
    background = rng.uniform(*config.background)
    hue = rng.uniform(0.6, 1.0, size=3)
    foreground = background + rng.uniform(*config.contrast) * hue
    image = np.where(mask, foreground, background) * np.asarray(config.colour_cast)
    image = image + rng.normal(0.0, config.noise, size=image.shape)
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


class TfbnShapes(tfds.core.GeneratorBasedBuilder):
    """Four shapes in two domains (`source`, `target`), generated locally."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="source", description="Bright shapes on a dark background."),
        ShapesConfig(
            name="target",
            description="Covariate shift: colour cast, bright background, low contrast, noise.",
            background=(0.35, 0.55),
            contrast=(0.2, 0.35),
            colour_cast=(1.25, 0.95, 0.6),
            noise=0.08,
            seed=1,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
                    "label": tfds.features.ClassLabel(names=SHAPES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def download_and_prepare(self, *args, **kwargs):
        """Generates the dataset locally, once; a no-op when it is prepared already.

        Prints one line saying what happens (nothing is downloaded) instead
        of TFDS's download message and progress bars.

        Args:
            *args: Passed to `tfds.core.DatasetBuilder.download_and_prepare`.
            **kwargs: Passed to `tfds.core.DatasetBuilder.download_and_prepare`.
        """
        # Not `self.is_prepared()`: on a first run it logs a warning about the
        # still-empty folder that TFDS itself created.
        if tf.io.gfile.exists(os.path.join(self.data_dir, "dataset_info.json")):
            return super().download_and_prepare(*args, **kwargs)
        name = f"{self.name}/{self.builder_config.name}"
        print(
            f"Generating the embedded dataset {name} (once, into {self.data_dir}; "
            "nothing is downloaded)...",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        progress_bars = tqdm_utils._active
        tfds.display_progress_bar(False)
        try:
            result = super().download_and_prepare(*args, **kwargs)
        finally:
            tfds.display_progress_bar(progress_bars)
        print(
            f"Generated {name} in {time.perf_counter() - start:.1f} s.", file=sys.stderr, flush=True
        )
        return result

    def _log_download_bytes(self) -> None:
        # TFDS prints "Downloading and preparing dataset ..." here; nothing is
        # downloaded, and `download_and_prepare` says what happens instead.
        pass

    def _log_download_done(self) -> None:
        pass

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split: str):
        split_index = list(SPLIT_SIZES).index(split)
        rng = np.random.default_rng([self.builder_config.seed, split_index])
        for index in range(SPLIT_SIZES[split]):
            label = index % len(SHAPES)
            yield index, {"image": render(self.builder_config, label, rng), "label": label}
