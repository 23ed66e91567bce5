"""The synthetic ``demo`` competition: nuclei images in the Data Science Bowl 2018 stage-1 layout.

Owns generation only: nucleus shapes and their clustering into touching, non-overlapping
instances, the fluorescence and bright-field renderers (blur, noise, uneven illumination, debris),
the folder layout and CSVs, and the marker that says a folder is a complete demo dataset.
Reading it back is the DSB reader's job, like any real download.

Layout under ``root``::
    stage1_train/<id>/images/<id>.png        RGB
    stage1_train/<id>/masks/<mask id>.png    one 0/255 PNG per nucleus
    stage1_test/<id>/images/<id>.png
    stage1_sample_submission.csv             ImageId,EncodedPixels (``<id>,1 1`` per test image)
    stage1_solution.csv                      test ground truth, one row per nucleus, RLE order "F"
    styles.json                              image id -> "fluorescence" | "brightfield" (fold strata)
    .kseg_demo.json                          generation parameters; written last
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from kseg.codecs.rle import encode
from kseg.core.errors import ConfigError, DataError

# Bump when the generator's output changes, so old folders are not mistaken for current ones.
FORMAT_VERSION = 1
MARKER_NAME = ".kseg_demo.json"
STYLES_NAME = "styles.json"
TRAIN_DIR = "stage1_train"
TEST_DIR = "stage1_test"
SAMPLE_SUBMISSION_NAME = "stage1_sample_submission.csv"
SOLUTION_NAME = "stage1_solution.csv"

DEFAULT_N_TRAIN = 48
DEFAULT_N_TEST = 12
SIZE_RANGE = (128, 320)  # height and width are drawn independently, inclusive
MIN_INSTANCE_AREA = 15  # smaller slivers (border cuts, squeezed nuclei) are dropped

FLUORESCENCE = "fluorescence"
BRIGHTFIELD = "brightfield"
# Variant -> style. Fluorescence dominates, as in DSB 2018 stage 1.
VARIANTS = {
    "fluorescence_gray": FLUORESCENCE,
    "fluorescence_tinted": FLUORESCENCE,
    "he_lavender": BRIGHTFIELD,
    "he_pale": BRIGHTFIELD,
    "he_eosin": BRIGHTFIELD,
    "brightfield_gray": BRIGHTFIELD,
}
# Each split takes its style mix from this cycle, shuffled block by block (see _variant).
_VARIANT_CYCLE = (
    "fluorescence_gray", "he_lavender", "fluorescence_gray", "fluorescence_tinted",
    "fluorescence_gray", "he_pale", "fluorescence_gray", "brightfield_gray",
    "fluorescence_gray", "fluorescence_tinted", "fluorescence_gray", "he_eosin",
)
_SPLIT_CODES = {"train": 0, "test": 1}

# Optical-density directions (log10 absorbance per R, G, B) measured on DSB 2018 stage-1
# bright-field images: the violet hematoxylin of its H&E tiles, eosin-rich stroma, and the
# lavender / neutral backgrounds.
_HEMATOXYLIN = np.array([0.47, 0.85, 0.20])
_EOSIN = np.array([0.16, 0.94, 0.31])
_BACKGROUND_OD = {
    "he_lavender": np.array([0.57, 0.75, 0.33]) * 0.28,
    "he_pale": np.array([0.62, 0.58, 0.52]) * 0.15,
    "he_eosin": np.array([0.55, 0.70, 0.45]) * 0.12,
}
_FLUORESCENCE_TINTS = (
    np.array([0.80, 0.55, 1.00]),  # lilac
    np.array([0.60, 0.60, 1.00]),  # blue-violet
    np.array([1.00, 0.75, 0.95]),  # pink-white
)


@dataclasses.dataclass
class DemoImage:
    """One generated image with its instance labels (int32, 0 = background) and style."""

    id: str
    split: str
    image: np.ndarray
    labels: np.ndarray
    style: str
    variant: str


# --------------------------------------------------------------------------------------------
# Public API


def write_demo_dataset(
    root: str | Path,
    *,
    seed: int = 0,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int = DEFAULT_N_TEST,
    overwrite: bool = False,
) -> Path:
    """Write the demo competition under ``root`` and return ``root``.

    The same arguments always give byte-identical files, and an image depends only on the seed,
    its split and its index, so a larger ``n_train`` keeps the smaller set's images. A folder that
    already holds a complete dataset made with the same arguments is returned untouched; one made
    with other arguments raises unless ``overwrite``; a non-empty folder without the marker is
    never replaced. Files are written into a hidden folder beside ``root`` that is renamed into
    place at the end, so an interrupted run never leaves a dataset that looks complete.
    """
    root = Path(root)
    params = _params(seed, n_train, n_test)
    if root.exists():
        if not root.is_dir():
            raise DataError("exists and is not a folder; choose another demo data folder", root)
        existing = read_demo_params(root)
        if existing is None and any(root.iterdir()):
            raise DataError(
                f"folder is not empty and holds no {MARKER_NAME}, so it is not a demo dataset; "
                "refusing to replace it (choose another folder or delete it)",
                root,
            )
        if existing == params and not overwrite:
            return root
        if existing is not None and existing != params and not overwrite:
            raise DataError(
                f"holds a demo dataset generated with {existing}, not the requested {params}; "
                "pass overwrite=True to regenerate it or choose another folder",
                root,
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.with_name(f".{root.name}.partial-{uuid.uuid4().hex}")
    staging.mkdir()  # a plain mkdir honours the umask, unlike mkdtemp's private 0700
    try:
        _write_dataset(staging, params)
        _move_into_place(staging, root, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def read_demo_params(root: str | Path) -> dict | None:
    """The generation parameters recorded in ``root``'s marker, or None when there is none."""
    marker = Path(root) / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())["params"]
    except (ValueError, KeyError, TypeError):
        return {"unreadable_marker": str(marker)}


def read_demo_styles(root: str | Path) -> dict[str, str]:
    """Image id -> style (``fluorescence`` / ``brightfield``), for style-stratified folds."""
    return json.loads((Path(root) / STYLES_NAME).read_text())


def image_id(seed: int, split: str, index: int) -> str:
    """A 64-hex-digit id like DSB's, fixed by the seed, the split and the image's index."""
    return hashlib.sha256(f"kseg-demo/{seed}/{split}/{index}".encode()).hexdigest()


def make_demo_image(seed: int, split: str, index: int, variant: str | None = None) -> DemoImage:
    """Generate one image and its labels in memory (``variant`` defaults to the split's mix)."""
    if split not in _SPLIT_CODES:
        raise ConfigError(f"split must be one of {sorted(_SPLIT_CODES)}, not {split!r}")
    if variant is None:
        variant = _variant(seed, split, index)
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {sorted(VARIANTS)}, not {variant!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODES[split], index]))
    height, width = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, size=2))
    labels, profile, traits = _nuclei(rng, (height, width), variant)
    if VARIANTS[variant] == FLUORESCENCE:
        image = _render_fluorescence(rng, labels, profile, traits, variant)
    elif variant == "brightfield_gray":
        image = _render_gray_brightfield(rng, labels, profile, traits)
    else:
        image = _render_he(rng, labels, profile, traits, variant)
    return DemoImage(image_id(seed, split, index), split, image, labels, VARIANTS[variant], variant)


# --------------------------------------------------------------------------------------------
# Nuclei: shapes, placement, non-overlapping instances


def _nuclei(rng: np.random.Generator, shape: tuple[int, int], variant: str):
    """Place irregular elliptical nuclei and split their overlaps into touching instances.

    Returns the label image, each pixel's normalised radius inside its nucleus (0 at the centre,
    1 at the rim; used for intensity profiles) and per-label traits (index 0 = background).
    """
    height, width = shape
    style = VARIANTS[variant]
    if variant == "brightfield_gray":
        radius, coverage, clustering = rng.uniform(6, 11), rng.uniform(0.015, 0.05), 0.05
        aspect_max, irregularity = rng.uniform(1.2, 1.7), rng.uniform(0.05, 0.12)
    elif style == BRIGHTFIELD:
        radius, coverage = np.exp(rng.uniform(np.log(7), np.log(16))), rng.uniform(0.10, 0.32)
        clustering, aspect_max = rng.uniform(0.3, 0.85), rng.uniform(1.4, 2.8)
        irregularity = rng.uniform(0.05, 0.15)
    else:
        radius, coverage = np.exp(rng.uniform(np.log(4), np.log(20))), rng.uniform(0.05, 0.32)
        clustering, aspect_max = 0.5 * rng.random() ** 1.5, rng.uniform(1.15, 1.8)
        irregularity = rng.uniform(0.03, 0.12)
    n_wanted = int(np.clip(round(coverage * height * width / (np.pi * radius**2)), 1, 220))
    radii = np.clip(radius * rng.lognormal(0.0, rng.uniform(0.12, 0.3), n_wanted), 3.0, 26.0)
    centres, radii = _place_centres(rng, shape, radii, clustering)
    n = len(radii)

    # Elongation keeps the area of the equivalent circle; orientation is coherent in some images
    # (tissue) and random in others (cultured cells).
    aspect = 1.0 + (aspect_max - 1.0) * rng.random(n) ** 1.5
    semi_major, semi_minor = radii * np.sqrt(aspect), radii / np.sqrt(aspect)
    spread = rng.choice([0.3, 0.8, np.pi])
    angles = rng.uniform(0, np.pi) + rng.normal(0.0, spread, n)
    orders = np.arange(2, 7)
    coefficients = rng.normal(0.0, 1.0, (n, orders.size)) * irregularity / orders**0.8
    phases = rng.uniform(0, 2 * np.pi, (n, orders.size))

    labels = np.zeros(shape, np.int32)
    profile = np.full(shape, np.inf, np.float32)
    for i in range(n):
        # Each pixel goes to the nucleus in whose normalised coordinates it lies deepest, so
        # overlapping nuclei end up pressed against each other along a shared boundary.
        reach = semi_major[i] * (1.0 + np.abs(coefficients[i]).sum()) + 2.0
        y0, y1 = max(int(centres[i, 0] - reach), 0), min(int(centres[i, 0] + reach) + 2, height)
        x0, x1 = max(int(centres[i, 1] - reach), 0), min(int(centres[i, 1] + reach) + 2, width)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - centres[i, 0], xx - centres[i, 1]
        cos, sin = np.cos(angles[i]), np.sin(angles[i])
        u = (dx * cos + dy * sin) / semi_major[i]
        v = (-dx * sin + dy * cos) / semi_minor[i]
        phi = np.arctan2(v, u)[..., None]
        rim = 1.0 + (coefficients[i] * np.cos(orders * phi + phases[i])).sum(-1)
        depth = np.hypot(u, v) / np.clip(rim, 0.55, 1.6)
        window = profile[y0:y1, x0:x1]
        wins = (depth < 1.0) & (depth < window)
        window[wins] = depth[wins]
        labels[y0:y1, x0:x1][wins] = i + 1

    labels = _clean_instances(labels)
    profile = np.where(labels > 0, profile, 1.0).astype(np.float32)
    n = int(labels.max())
    traits = _traits(rng, n, style)
    return labels, profile, traits


def _place_centres(rng, shape, radii, clustering):
    """Scatter centres, a ``clustering`` share of them pressed against an earlier nucleus.

    Clustered nuclei may overlap their neighbours (the overlap becomes a shared boundary);
    scattered ones keep a small gap, so touching happens where the image means it to.
    """
    height, width = shape
    centres = np.empty((0, 2))
    kept = []
    for radius in radii:
        for _ in range(25):
            if kept and rng.random() < clustering:
                j = rng.integers(len(kept))
                direction = rng.uniform(0, 2 * np.pi)
                distance = (radius + kept[j]) * rng.uniform(0.78, 1.1)
                candidate = centres[j] + distance * np.array([np.sin(direction), np.cos(direction)])
                spacing, padding = 0.7, 0.0
            else:
                margin = 0.3 * radius
                candidate = rng.uniform([-margin, -margin], [height + margin, width + margin])
                spacing, padding = 1.1, 2.0
            gaps = np.hypot(*(centres - candidate).T) if kept else np.empty(0)
            if np.all(gaps >= spacing * (radius + np.asarray(kept)) + padding):
                centres = np.vstack([centres, candidate])
                kept.append(float(radius))
                break
    return centres, np.asarray(kept)


def _clean_instances(labels: np.ndarray) -> np.ndarray:
    """Keep each instance's largest 4-connected piece, drop slivers, renumber 1..K."""
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        own = labels[box] == index
        pieces, n_pieces = ndimage.label(own)
        if n_pieces > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            own &= pieces != (np.argmax(sizes) + 1)
            labels[box][own] = 0
            own = labels[box] == index
        if own.sum() < MIN_INSTANCE_AREA:
            labels[box][own] = 0
    present = np.unique(labels)
    lookup = np.zeros(int(labels.max()) + 1, np.int32)
    lookup[present] = np.arange(present.size, dtype=np.int32)
    return lookup[labels]


def _traits(rng, n, style):
    """Per-nucleus brightness (stain), texture strength and focus; index 0 is background."""
    brightness = rng.lognormal(0.0, rng.uniform(0.05, 0.25), n + 1)
    defocused = rng.random(n + 1) < rng.uniform(0.0, 0.15)
    if style == FLUORESCENCE:
        brightness[defocused] *= rng.uniform(0.12, 0.35, int(defocused.sum()))
        condensed = rng.random(n + 1) < rng.uniform(0.0, 0.08)  # mitotic, very bright
        brightness[condensed] *= rng.uniform(1.8, 3.0, int(condensed.sum()))
    else:
        brightness[defocused] *= rng.uniform(0.35, 0.6, int(defocused.sum()))
    texture = rng.uniform(0.04, 0.25) * rng.uniform(0.6, 1.4, n + 1)
    brightness[0], texture[0], defocused[0] = 0.0, 0.0, False
    return {"brightness": brightness.astype(np.float32), "texture": texture.astype(np.float32),
            "defocused": defocused}


# --------------------------------------------------------------------------------------------
# Rendering


def _render_fluorescence(rng, labels, profile, traits, variant):
    """Dark background, glowing nuclei with chromatin texture, haze, vignetting, shot noise."""
    shape = labels.shape
    inside = labels > 0
    dome = rng.uniform(0.1, 0.45)
    chromatin = _chromatin(rng, shape, rng.uniform(0.7, 1.6))
    signal = traits["brightness"][labels] * (1.0 - dome * profile**2)
    signal *= np.clip(1.0 + traits["texture"][labels] * chromatin, 0.45, None)
    signal[~inside] = 0.0
    blurry = traits["defocused"][labels]
    sharp_sigma = rng.uniform(0.5, 1.6)
    image = _blur(np.where(blurry, 0.0, signal), sharp_sigma)
    image += _blur(np.where(blurry, signal, 0.0), rng.uniform(2.0, 3.5))
    image += _blur(_debris(rng, shape, bright=True), sharp_sigma)

    background = rng.uniform(0.01, 0.1) + rng.uniform(0.0, 0.02) * _smooth_field(rng, shape, 3)
    haze = rng.uniform(0.1, 0.35) if rng.random() < 0.25 else 0.0
    image += background + haze * _haze(rng, shape)
    image *= _illumination(rng, shape, strength=rng.uniform(0.0, 0.5))

    photons = np.exp(rng.uniform(np.log(40), np.log(1500)))
    image = rng.poisson(np.clip(image, 0, None) * photons) / photons
    image += rng.normal(0.0, rng.uniform(0.001, 0.006), shape)
    peak = rng.uniform(40, 220)
    gray = image * peak
    if variant == "fluorescence_tinted":
        tint = _FLUORESCENCE_TINTS[rng.integers(len(_FLUORESCENCE_TINTS))]
        rgb = gray[..., None] * tint
    else:
        rgb = np.repeat(gray[..., None], 3, axis=2)
    return _to_uint8(rgb)


def _render_he(rng, labels, profile, traits, variant):
    """H&E-like bright field: Beer-Lambert mix of hematoxylin nuclei, eosin stroma, cell bodies."""
    shape = labels.shape
    inside = labels > 0
    # Nuclei: violet hematoxylin, a darker rim (membrane) and coarse chromatin.
    stain = rng.uniform(0.45, 0.95)
    chromatin = _chromatin(rng, shape, rng.uniform(0.8, 1.8))
    rim = rng.uniform(0.0, 0.35)
    nuclear = stain * traits["brightness"][labels] * (0.85 + rim * profile**4)
    nuclear *= np.clip(1.0 + traits["texture"][labels] * chromatin, 0.3, None)
    nuclear[~inside] = 0.0
    blurry = traits["defocused"][labels]
    sharp_sigma = rng.uniform(0.4, 1.1)
    nuclear = _blur(np.where(blurry, 0.0, nuclear), sharp_sigma) + _blur(
        np.where(blurry, nuclear, 0.0), rng.uniform(1.5, 2.5))

    # Stroma: a smooth tint, pale cytoplasm around nuclei, thin membrane lines; eosin-rich
    # tissue adds dense pink bands, pale slides scattered red cells.
    reach = int(rng.uniform(3, 9))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    cells = _blur(cv2.dilate(inside.astype(np.uint8), kernel).astype(np.float32), reach / 2 + 1)
    tissue = (1.0 + rng.uniform(0.03, 0.12) * _smooth_field(rng, shape, 4)
              + rng.uniform(0.1, 0.3) * cells + rng.uniform(0.2, 0.7) * _membrane_lines(rng, shape))
    eosin = rng.uniform(0.0, 0.04) + rng.uniform(0.02, 0.1) * cells
    if variant == "he_eosin":
        level = rng.uniform(-0.3, 0.3)
        band = _blur(np.clip((_smooth_field(rng, shape, 3) - level) * 6.0, 0, 1), 1.5)
        eosin += band * rng.uniform(0.45, 0.75) * np.clip(1.0 + 0.12 * _fibres(rng, shape), 0, None)
        eosin += (1.0 - band) * rng.uniform(0.06, 0.18)
    elif variant == "he_pale":
        eosin += _red_cells(rng, shape)

    density = (
        nuclear[..., None] * _HEMATOXYLIN
        + eosin[..., None] * _EOSIN
        + tissue[..., None] * _BACKGROUND_OD[variant] * rng.uniform(0.75, 1.1)
        + _debris(rng, shape, bright=False)[..., None] * _HEMATOXYLIN
    )
    light = 250.0 * _illumination(rng, shape, strength=rng.uniform(0.0, 0.12))
    rgb = light[..., None] * np.power(10.0, -density)
    rgb = cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), rng.uniform(0.3, 0.7))
    rgb += rng.normal(0.0, rng.uniform(1.0, 4.0), rgb.shape)
    return _to_uint8(rgb)


def _render_gray_brightfield(rng, labels, profile, traits):
    """Gray transmitted light: large pale cells with darker edges, dark textured nuclei."""
    shape = labels.shape
    height, width = shape
    inside = labels > 0
    # Pale cell bodies: big irregular blobs around (and sometimes without) nuclei.
    cells = np.zeros(shape, np.uint8)
    nuclei = np.arange(1, int(labels.max()) + 1)
    centres = [np.asarray(c) for c in ndimage.center_of_mass(inside, labels, nuclei)]
    centres += list(rng.uniform([0, 0], [height, width], (int(rng.integers(0, 3)), 2)))
    for centre in centres:
        axes = rng.uniform(25, 60, 2)
        jitter = rng.normal(0.0, 10.0, 2)
        polygon = _blob_polygon(rng, centre[::-1] + jitter, axes)
        cv2.fillPoly(cells, [polygon], 1)
    cell_area = _blur(cells.astype(np.float32), 1.0)
    edges = _blur(np.abs(cv2.Laplacian(_blur(cells.astype(np.float32), 1.5), cv2.CV_32F)), 1.0)
    texture = 0.3 * _smooth_field(rng, shape, 12) + _smooth_noise(rng, shape, 1.5) * 0.2
    density = cell_area * rng.uniform(0.08, 0.2) * (1.0 + 0.25 * texture)
    density += edges * rng.uniform(0.5, 1.2)

    chromatin = _chromatin(rng, shape, rng.uniform(0.8, 1.5))
    nuclear = rng.uniform(0.4, 0.8) * traits["brightness"][labels] * (0.8 + 0.3 * profile**3)
    nuclear *= np.clip(1.0 + traits["texture"][labels] * chromatin, 0.3, None)
    nuclear[~inside] = 0.0
    density += _blur(nuclear, rng.uniform(0.5, 1.0)) + 0.6 * _debris(rng, shape, bright=False)
    density += rng.uniform(0.03, 0.07)
    light = 250.0 * _illumination(rng, shape, strength=rng.uniform(0.0, 0.1))
    gray = light * np.power(10.0, -density) + rng.normal(0.0, rng.uniform(1.0, 3.0), shape)
    return _to_uint8(np.repeat(gray[..., None], 3, axis=2))


def _blob_polygon(rng, centre_xy, axes):
    """An irregular closed outline (OpenCV int32 points) around ``centre_xy``."""
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    orders = np.arange(2, 6)[:, None]
    phases = rng.uniform(0, 2 * np.pi, orders.shape)
    wobble = rng.normal(0.0, 0.12 / orders) * np.cos(orders * theta + phases)
    radius = 1.0 + wobble.sum(0)
    angle = rng.uniform(0, np.pi)
    x, y = axes[0] * radius * np.cos(theta), axes[1] * radius * np.sin(theta)
    cos, sin = np.cos(angle), np.sin(angle)
    points = np.stack([x * cos - y * sin, x * sin + y * cos], 1)
    return np.round(points + centre_xy).astype(np.int32)


def _membrane_lines(rng, shape):
    """Thin wandering lines (cell membranes, fibres) drawn as random walks, peak near 1."""
    height, width = shape
    layer = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(3, 16))):
        steps = int(rng.integers(10, 60))
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.12, steps))
        start = rng.uniform([0, 0], [width, height])
        points = start + 3.0 * np.cumsum(np.stack([np.cos(heading), np.sin(heading)], 1), axis=0)
        strength = float(rng.uniform(0.4, 1.0))
        cv2.polylines(layer, [np.round(points).astype(np.int32)], False, strength, 1, cv2.LINE_AA)
    return _blur(layer, 0.7)


def _red_cells(rng, shape):
    """Pale eosin discs scattered over the slide (red blood cells), in optical density."""
    layer = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(0, 25))):
        centre = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        axes = (int(rng.integers(3, 8)), int(rng.integers(3, 7)))
        density = float(rng.uniform(0.08, 0.25))
        cv2.ellipse(layer, centre, axes, rng.uniform(0, 180), 0, 360, density, -1)
    return _blur(layer, 1.0)


def _chromatin(rng, shape, sigma):
    """Unit-variance granular texture plus sparse bright chromocentres."""
    grain = _smooth_noise(rng, shape, sigma)
    spots = _blur((rng.random(shape) < 0.004).astype(np.float32), 1.2)
    return grain + spots / (spots.max() + 1e-6) * rng.uniform(0.0, 2.0)


def _debris(rng, shape, bright):
    """Small unlabelled specks and crumbs that a thresholder mistakes for nuclei."""
    layer = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(0, 9))):
        centre = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        axes = (int(rng.integers(1, 4)), int(rng.integers(1, 3)))
        level = rng.uniform(0.1, 0.7) if bright else rng.uniform(0.2, 0.7)
        cv2.ellipse(layer, centre, axes, rng.uniform(0, 180), 0, 360, float(level), -1)
    return layer


def _haze(rng, shape):
    """Out-of-focus glow: a few broad Gaussian bumps, peak near 1."""
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    haze = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(-0.2, 1.2) * height, rng.uniform(-0.2, 1.2) * width
        sigma = rng.uniform(0.2, 0.6) * max(height, width)
        haze += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return haze


def _illumination(rng, shape, strength):
    """Multiplicative uneven lighting: a tilted plane times a vignette, 1 at its brightest."""
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / height - 0.5, xx / width - 0.5
    direction = rng.uniform(0, 2 * np.pi)
    plane = 1.0 + strength * (np.cos(direction) * xx + np.sin(direction) * yy) * 2.0
    cy, cx = rng.uniform(-0.3, 0.3, 2)
    vignette = 1.0 - strength * ((yy - cy) ** 2 + (xx - cx) ** 2) * 2.0
    field = np.clip(plane * vignette, 0.05, None)
    return field / field.max()


def _fibres(rng, shape):
    """Zero-mean, unit-variance streaky texture at one random angle (collagen-like)."""
    size = 31
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[-(size // 2): size // 2 + 1, -(size // 2): size // 2 + 1].astype(np.float32)
    cos, sin = np.cos(angle), np.sin(angle)
    along, across = xx * cos + yy * sin, -xx * sin + yy * cos
    kernel = np.exp(-(along**2) / (2 * 5.0**2) - across**2 / (2 * 1.5**2))
    noise = rng.standard_normal(shape).astype(np.float32)
    streaks = cv2.filter2D(noise, -1, kernel / kernel.sum(), borderType=cv2.BORDER_REFLECT)
    streaks += 0.5 * _smooth_noise(rng, shape, 6.0) * streaks.std()
    return (streaks - streaks.mean()) / (streaks.std() + 1e-6)


def _smooth_noise(rng, shape, sigma):
    """Gaussian-filtered white noise rescaled to zero mean and unit variance."""
    field = _blur(rng.standard_normal(shape).astype(np.float32), sigma)
    return (field - field.mean()) / (field.std() + 1e-6)


def _smooth_field(rng, shape, cells):
    """Very low-frequency noise in [-1, 1]: a ``cells`` x ``cells`` grid resized bicubically."""
    coarse = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    return np.clip(cv2.resize(coarse, shape[::-1], interpolation=cv2.INTER_CUBIC), -1.0, 1.0)


def _blur(array, sigma):
    array = np.asarray(array, np.float32)
    return cv2.GaussianBlur(array, (0, 0), float(sigma), borderType=cv2.BORDER_REFLECT)


def _to_uint8(array):
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Files


def _params(seed, n_train, n_test) -> dict:
    """Validated generation parameters, as recorded in (and compared with) the marker."""
    for name, value, lowest in (("seed", seed, 0), ("n_train", n_train, 0), ("n_test", n_test, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
            raise ConfigError(f"{name} must be an integer >= {lowest}, not {value!r}")
    if n_train + n_test < 1:
        raise ConfigError("n_train + n_test must be at least 1")
    return {"format_version": FORMAT_VERSION, "seed": int(seed), "n_train": int(n_train),
            "n_test": int(n_test), "size_range": list(SIZE_RANGE)}


def _variant(seed: int, split: str, index: int) -> str:
    """Image ``index``'s variant: the cycle shuffled block by block, so it never depends on n.

    In the first block a bright-field entry is moved to position 1, so any split of two or more
    images holds both styles.
    """
    block, position = divmod(index, len(_VARIANT_CYCLE))
    block_seed = np.random.SeedSequence([seed, _SPLIT_CODES[split], 1_000_003, block])
    rng = np.random.default_rng(block_seed)
    order = [_VARIANT_CYCLE[i] for i in rng.permutation(len(_VARIANT_CYCLE))]
    if block == 0 and VARIANTS[order[0]] == VARIANTS[order[1]]:
        other = next(i for i, v in enumerate(order) if VARIANTS[v] != VARIANTS[order[0]])
        order[1], order[other] = order[other], order[1]
    return order[position]


def _mask_id(image_id_: str, index: int) -> str:
    return hashlib.sha256(f"{image_id_}/mask/{index}".encode()).hexdigest()


def _solution_lines(image_id_: str, labels: np.ndarray) -> list[str]:
    """CSV lines ``id,rle`` of one test image, one per nucleus; an empty image gets ``id,``."""
    rles = [encode(labels == k, order="F") for k in range(1, int(labels.max()) + 1)]
    return [f"{image_id_},{rle}\n" for rle in (rles or [""])]


def _write_png(path: Path, array: np.ndarray) -> None:
    if array.ndim == 3:
        array = array[..., ::-1]  # OpenCV writes BGR
    if not cv2.imwrite(str(path), np.ascontiguousarray(array)):
        raise DataError("could not write PNG", path)


def _write_dataset(folder: Path, params: dict) -> None:
    """Every file of the dataset into ``folder``; the marker goes last."""
    images = {}
    solution_lines = []
    for split, count, directory in (("train", params["n_train"], TRAIN_DIR),
                                    ("test", params["n_test"], TEST_DIR)):
        for index in range(count):
            sample = make_demo_image(params["seed"], split, index)
            sample_dir = folder / directory / sample.id
            (sample_dir / "images").mkdir(parents=True)
            _write_png(sample_dir / "images" / f"{sample.id}.png", sample.image)
            n_nuclei = int(sample.labels.max())
            if split == "train":
                (sample_dir / "masks").mkdir()
                for k in range(1, n_nuclei + 1):
                    mask = np.where(sample.labels == k, 255, 0).astype(np.uint8)
                    _write_png(sample_dir / "masks" / f"{_mask_id(sample.id, k)}.png", mask)
            else:
                solution_lines.extend(_solution_lines(sample.id, sample.labels))
            images[sample.id] = {"split": split, "style": sample.style, "variant": sample.variant,
                                 "n_nuclei": n_nuclei, "height": sample.labels.shape[0],
                                 "width": sample.labels.shape[1]}

    header = "ImageId,EncodedPixels\n"
    test_ids = sorted(i for i, record in images.items() if record["split"] == "test")
    (folder / SAMPLE_SUBMISSION_NAME).write_text(header + "".join(f"{i},1 1\n" for i in test_ids))
    # Sorted by image id; a stable sort keeps each image's nuclei in label order.
    solution_lines.sort(key=lambda line: line.split(",", 1)[0])
    (folder / SOLUTION_NAME).write_text(header + "".join(solution_lines))
    styles = {i: record["style"] for i, record in images.items()}
    (folder / STYLES_NAME).write_text(json.dumps(styles, indent=1, sort_keys=True) + "\n")
    marker = {"generator": "kseg.io.demo", "params": params, "images": images}
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")


def _move_into_place(staging: Path, root: Path, params: dict) -> None:
    """Rename the finished folder to ``root``, replacing an old demo dataset or an empty folder."""
    retired = None
    if root.exists():
        if any(root.iterdir()):
            retired = root.with_name(f".{root.name}.old-{uuid.uuid4().hex}")
            os.rename(root, retired)
        else:
            root.rmdir()
    try:
        os.rename(staging, root)
    except OSError:
        # Another process finished the same dataset first: theirs is as good as ours.
        if read_demo_params(root) != params:
            raise
    finally:
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
