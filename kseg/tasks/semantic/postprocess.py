"""From per-pixel probabilities to what a submission writes: instance label images, masks, or
class-index masks, and the post-processing settings of a run.

Uses SciPy / scikit-image / OpenCV: threshold, hole filling, small-object removal, and instance
separation by connected components, by watershed on the distance transform, or by
marker-controlled watershed from mask + border (or mask + center) channels, the DSB 2018
winners' recipe. Every function returns an int32 label image whose instances never overlap.

A model with ``classification_head`` gives one channel more than its targets: the probability
that the image holds any foreground, the same at every pixel (``kseg.tasks.semantic.auxiliary``).
``probabilities_to_target`` takes it off before anything else reads the channels, and with
``empty_threshold`` set it empties the prediction of an image whose probability (the channel's
mean: after tiling, the tiles' blend) is below the threshold (``gate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import measure, morphology, segmentation

from kseg.core.config import apply_overrides
from kseg.core.errors import ConfigError
from kseg.core.runs import tuned_postprocess
from kseg.data.masks import clean_mask, remove_small_instances
from kseg.tasks.semantic.targets import CLASSES, target_channels

METHODS = ("components", "distance", "markers")


def _with_orphans(labels: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Watershed labels plus the foreground pieces that got no seed (small or thin objects), each
    its own object: a seed rule must never turn a kept object into background."""
    orphans = measure.label(foreground & (labels == 0), connectivity=1)
    return np.where(orphans > 0, orphans + labels.max(), labels)


def instances_from_probabilities(
    probabilities: np.ndarray,
    method: str = "components",
    threshold: float = 0.5,
    min_size: int = 8,
    marker_threshold: float = 0.5,
    second_channel: str = "border",
) -> np.ndarray:
    """Instance labels from an H x W x C probability map.

    Channel 0 is the foreground. ``components``: connected components of the thresholded mask.
    ``distance``: watershed on the distance transform, seeded at its local maxima.
    ``markers``: channel 1 is a ``second_channel`` ("border" or "center") probability; seeds are
    foreground minus border (or the centers), grown back over the foreground by watershed on the
    foreground probability.
    """
    if probabilities.ndim == 2:
        probabilities = probabilities[..., None]
    if method not in METHODS:
        raise ConfigError(f"post-processing method {method!r} is not one of {METHODS}")
    foreground = clean_mask(probabilities[..., 0] > threshold, min_size=min_size)
    if not foreground.any():
        return np.zeros(foreground.shape, np.int32)
    if method == "components":
        labels = measure.label(foreground, connectivity=1)
    elif method == "distance":
        distance = ndimage.distance_transform_edt(foreground)
        peaks = morphology.h_maxima(ndimage.gaussian_filter(distance, 1.0), 1.0) & foreground
        markers = measure.label(peaks)
        labels = _with_orphans(segmentation.watershed(-distance, markers, mask=foreground), foreground)
    else:
        if probabilities.shape[-1] < 2:
            raise ConfigError("method 'markers' needs a second (border or center) channel")
        second = probabilities[..., 1]
        if second_channel not in ("border", "center"):
            raise ConfigError(f"second_channel must be 'border' or 'center', not {second_channel!r}")
        seeds = foreground & ((second < marker_threshold) if second_channel == "border" else (second > marker_threshold))
        seeds = morphology.remove_small_objects(seeds, max_size=max(1, min_size // 4))
        markers = measure.label(seeds, connectivity=1)
        labels = _with_orphans(segmentation.watershed(-probabilities[..., 0], markers, mask=foreground), foreground)
    return remove_small_instances(labels.astype(np.int32), min_size)


POSTPROCESS_KEYS = ("method", "threshold", "min_size", "marker_threshold", "second_channel", "empty_threshold")
INSTANCE_KEYS = POSTPROCESS_KEYS[:5]  # the arguments of instances_from_probabilities


def split_image_probability(probabilities: np.ndarray, targets: str = "mask") -> tuple[np.ndarray, float | None]:
    """(per-pixel channels, the image's non-empty probability or None): the last channel is the
    classification head's when there is one more channel than ``targets`` names."""
    if probabilities.ndim != 3 or targets == CLASSES or probabilities.shape[-1] != len(target_channels(targets)) + 1:
        return probabilities, None
    return probabilities[..., :-1], float(np.mean(probabilities[..., -1], dtype=np.float64))


def gate(target: np.ndarray, image_probability: float | None, empty_threshold: float | None) -> np.ndarray:
    """``target`` itself, or all zeros when the image's non-empty probability is below
    ``empty_threshold`` (None: off, as is a model without the classification head)."""
    if empty_threshold is None or image_probability is None or image_probability >= float(empty_threshold):
        return target
    return np.zeros_like(target)


# --- from probabilities to rows ---------------------------------------------------------------------
def probabilities_to_target(probabilities: np.ndarray, fmt, post: Mapping,
                            targets: str = "mask") -> np.ndarray:
    """What the format writes: int32 instance labels, a 0/1 mask, or a uint8 class-index mask.

    ``targets`` is the run's ``generator.targets``: ``classes`` models give softmax channels
    (index = class, 0 = background); all others give channel 0 = foreground probability, and
    maybe the image-level channel last (see the module notes; ``post["empty_threshold"]``).
    """
    probabilities, image_probability = split_image_probability(np.asarray(probabilities), targets)
    target = _pixels_to_target(probabilities, fmt, post, targets)
    return gate(target, image_probability, post.get("empty_threshold"))


def _pixels_to_target(probabilities: np.ndarray, fmt, post: Mapping, targets: str) -> np.ndarray:
    params = {k: post[k] for k in INSTANCE_KEYS if k in post}
    min_size = int(params.get("min_size", 0))
    if probabilities.ndim == 2:
        probabilities = probabilities[..., None]
    if targets == "classes":
        classes = np.argmax(probabilities, axis=-1).astype(np.uint8)
        if fmt.rows == "instance":
            labels = np.zeros(classes.shape, np.int32)
            for k in range(1, probabilities.shape[-1]):
                part = measure.label(clean_mask(classes == k, min_size), connectivity=1)
                labels = np.where(part > 0, part + labels.max(), labels).astype(np.int32)
            return labels
        out = np.zeros(classes.shape, np.uint8)
        for k in range(1, probabilities.shape[-1]):
            out[clean_mask(classes == k, min_size)] = k
        return (out > 0).astype(np.uint8) if fmt.rows == "image" else out
    if fmt.rows == "instance":
        return instances_from_probabilities(probabilities, **params)
    threshold = float(params.get("threshold", 0.5))
    return clean_mask(probabilities[..., 0] > threshold, min_size).astype(np.uint8)


def resolve_postprocess(run_dir: Path, cfg, overrides: Iterable[str] = ()) -> dict:
    """Post-processing for a run: config < tuned ``postprocess.json`` < explicit ``--set postprocess.*``."""
    post = dict(cfg.postprocess)
    post.update({k: v for k, v in tuned_postprocess(run_dir).items() if k in POSTPROCESS_KEYS})
    explicit = [o for o in overrides if o.strip().startswith("postprocess.")]
    return apply_overrides({"postprocess": post}, explicit)["postprocess"] if explicit else post
