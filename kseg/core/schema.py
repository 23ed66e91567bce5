"""Types, ranges and choices of every pipeline setting, checked when a config loads.

:func:`validate_config` runs at the end of :func:`kseg.core.config.load_config`, before anything
is read, preprocessed or written, and raises one :class:`~kseg.core.errors.ConfigError` listing
every problem found, one line each: ``key.path: what is wrong (what is allowed)``.

The defaults live in ``pipelines/_base.yaml`` alone: the models below declare types, ranges and
choices only. A key the base always sets is required (``Optional`` where ``null`` is allowed);
a key the code reads but the base leaves out (``dataset.demo_args``) is optional. Free-form
mappings (``model.args``, ``train.loss_args``, ``detection.loss_args``, ``dataset.options``,
``dataset.demo_args``) must be mappings; what they hold is for their builder to check. Model
names and dataset layouts are registries of their own, checked where they are looked up.

``core`` imports no other layer, so the choice lists of other layers are repeated here
(tests/core/test_schema.py keeps them equal to the constants they copy); submission formats are
``core``'s own and are read from :data:`kseg.core.formats.FORMATS` when a config is checked.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from kseg.core.errors import ConfigError
from kseg.core.formats import FORMATS
from kseg.core.pipelines import BASE_NAME, PIPELINES_DIR, load_raw

# -- choices (copies of other layers' constants; see the module docstring) -------------------------
PREPROCESS_MODES = ("none", "resize", "pad")  # kseg.data.preprocess.MODES
WEIGHT_MAPS = ("unet", "balance", "none")  # kseg.data.preprocess.WEIGHT_MAPS
CLASS_WEIGHTS = ("balanced", "none")
ON_ERROR = ("raise", "skip")
INTENSITY_POLICIES = ("auto", "uint8", "percentile")  # kseg.io.intensity.POLICIES
MODALITIES = ("keep", "fluorescence")  # kseg.io.modality.MODALITIES
AUGMENT_PRESETS = ("none", "flips", "microscopy", "natural", "microscopy_colour",
                   "microscopy_mixed")  # kseg.data.augment.PRESETS
TARGET_CHANNELS = ("mask", "border", "center")  # kseg.tasks.semantic.targets.CHANNEL_NAMES
TARGET_CLASSES = "classes"  # kseg.tasks.semantic.targets.CLASSES
DETECTION_LOSSES = ("mining", "focal")  # kseg.tasks.ssd.model.MultiboxLossLayer.LOSSES
POSTPROCESS_METHODS = ("components", "distance", "markers")  # kseg.tasks.semantic.postprocess.METHODS
SECOND_CHANNELS = ("border", "center")
LOSS_NAMES = ("bce", "ce", "dice", "bce_dice", "focal", "lovasz", "tversky")  # kseg.tasks.semantic.losses
COMBINABLE_LOSSES = ("bce", "dice", "bce_dice", "focal", "lovasz", "tversky")  # a {name: weight} train.loss
SCHEDULES = ("plateau", "cosine", "cosine_restarts", "constant")
METRICS = ("iou_map", "f2", "tgs_iou_map", "dice")  # kseg.metrics.scores.METRICS
TRAIN_METRICS = ("auto", "class_iou", *METRICS)
STRATEGIES = ("auto", "default", "mirrored")  # kseg.engine.distribute.STRATEGIES
PRECISIONS = ("auto", "on", "off", "bfloat16", "float16")  # kseg.engine.precision
AUGMENT_SEEDINGS = ("independent", "shared")  # kseg.data.augment.SEEDINGS
VERBOSITY = (0, 1, 2)
CHECKPOINTS = ("best", "last", "averaged", "cycles")  # kseg.tasks.base.CHECKPOINTS
AVERAGE_FROM = ("best", "last")  # kseg.engine.averaging.AVERAGE_FROM
TTA_PRESETS = ("none", "flips", "rotations", "d4")  # kseg.tasks.semantic.predictor.TTA_PRESETS
TTA_TRANSFORMS = ("identity", "flip_h", "flip_v", "rot90", "rot180", "rot270", "transpose",
                  "transverse")  # kseg.tasks.semantic.predictor.TRANSFORMS

# Other names a user may reach for: offered as "did you mean" suggestions only, never accepted.
ALIASES: dict[str, dict[str, str]] = {
    "postprocess.method": {"watershed": "distance", "connected_components": "components", "label": "components",
                           "marker_watershed": "markers"},
    "train.schedule": {"reduce_on_plateau": "plateau", "cosine_decay": "cosine", "none": "constant"},
    "predict.checkpoint": {"latest": "last", "final": "last"},
}


# -- value checks that pydantic's own types do not express ------------------------------------------
def _problem(message: str) -> PydanticCustomError:
    return PydanticCustomError("kseg", "{message}", {"message": message})


def show(value: Any) -> str:
    """A value as a line of an error message: strings quoted, YAML spellings of null and booleans."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def suggestion(value: Any, options: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """`` (did you mean 'x'?)`` for the closest option or alias of a mistyped name, else ``""``."""
    if not isinstance(value, str) or not value:
        return ""
    aliases = dict(aliases or {})
    names = {str(o).lower(): str(o) for o in options}
    names.update({alias.lower(): target for alias, target in aliases.items()})
    close = difflib.get_close_matches(value.lower(), list(names), n=1, cutoff=0.6)
    found = {names[close[0]]} if close else {names[n] for n in names if n.startswith(value.lower())}
    # An abbreviation ('dsb' for 'dsb_instances') is suggested only when it picks one name.
    return f" (did you mean {found.pop()!r}?)" if len(found) == 1 and len(value) > 1 else ""


def _one_of(options: Sequence[Any]) -> str:
    return ", ".join(str(o) for o in options)


def choice(options: Sequence[Any] | Callable[[], Sequence[Any]], key: str = "") -> Any:
    """A value that must be one of ``options`` (or of what a callable gives when the config is checked)."""

    def check(value: Any) -> Any:
        allowed = tuple(options() if callable(options) else options)
        if isinstance(value, bool) or value not in allowed:
            hint = suggestion(value, [o for o in allowed if isinstance(o, str)], ALIASES.get(key))
            raise _problem(f"{show(value)} is not one of {_one_of(allowed)}{hint}")
        return value

    return Annotated[Any, BeforeValidator(check)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _loss(value: Any) -> Any:
    """A loss name, or a combination by weight such as ``{bce: 3, dice: 1, focal: 4}``."""
    if isinstance(value, Mapping):
        if not value:
            raise _problem("an empty loss combination: name losses with weights, e.g. {bce: 3, dice: 1}")
        for name, weight in value.items():
            if name not in COMBINABLE_LOSSES:
                hint = suggestion(name, list(COMBINABLE_LOSSES), None)
                raise _problem(f"{show(name)} cannot be combined; combine {_one_of(COMBINABLE_LOSSES)}{hint}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise _problem(f"the weight of {name} must be a positive number (got {show(weight)})")
        return value
    if isinstance(value, str) and value in LOSS_NAMES:
        return value
    hint = suggestion(value, list(LOSS_NAMES), None) if isinstance(value, str) else ""
    raise _problem(f"{show(value)} is not one of {_one_of(LOSS_NAMES)} or a {{loss: weight}} combination{hint}")


def _head_weights(value: Any) -> Any:
    """A weight >= 0 for every deep-supervision head, or a list of them (one per head)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
        raise _problem(f"{show(value)} is not a number >= 0 or a list of such numbers (one per auxiliary head)")
    return value


def _precision(value: Any) -> Any:
    if isinstance(value, bool) or value in PRECISIONS:
        return value
    hint = suggestion(value, list(PRECISIONS), None)
    raise _problem(f"{show(value)} is not one of {_one_of(PRECISIONS)} or true / false{hint}")


def _size_pair(value: Any) -> Any:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v >= 1 for v in value)):
        raise _problem(f"must be [height, width], two integers of at least 1 (got {show(value)})")
    return value


def _fraction_range(value: Any) -> Any:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) and 0 < v <= 1 for v in value)
            and value[0] <= value[1]):
        raise _problem(f"must be [low, high] with 0 < low <= high <= 1 (got {show(value)})")
    return value


def _nonzero_jobs(value: Any) -> Any:
    if _is_int(value) and value == 0:
        raise _problem("must not be 0 (a number of processes, or -1 for one per core)")
    return value


def _targets(value: Any) -> Any:
    allowed = f"{' | '.join(TARGET_CHANNELS)} joined with '+' (e.g. 'mask+border'), or {TARGET_CLASSES!r}"
    if not isinstance(value, str) or not value.strip():
        raise _problem(f"{show(value)} is not a target spec: {allowed}")
    if value.strip() == TARGET_CLASSES:
        return value
    names = [name.strip() for name in value.split("+")]
    unknown = [name for name in names if name not in TARGET_CHANNELS]
    if unknown:
        hint = suggestion(unknown[0], [*TARGET_CHANNELS, TARGET_CLASSES])
        raise _problem(f"{show(value)} names an unknown target {unknown[0]!r}{hint}; targets: {allowed}")
    if len(set(names)) != len(names):
        raise _problem(f"{show(value)} names a channel twice")
    return value


def _tta(value: Any) -> Any:
    allowed = f"a preset ({_one_of(TTA_PRESETS)}) or a list of {_one_of(TTA_TRANSFORMS)}"
    if value is None or value is False or (isinstance(value, str) and value in TTA_PRESETS):
        return value
    if isinstance(value, str):
        names = [name.strip() for name in value.split(",")]
    elif isinstance(value, (list, tuple)):
        names = list(value)
    else:
        raise _problem(f"{show(value)} is not {allowed}")
    unknown = [name for name in names if name not in TTA_TRANSFORMS]
    if unknown or not names:
        hint = suggestion(unknown[0], [*TTA_PRESETS, *TTA_TRANSFORMS]) if unknown else ""
        raise _problem(f"{show(value)} is not {allowed}{hint}")
    if len(set(names)) != len(names):
        raise _problem(f"{show(value)} names a transform twice (it would weigh double)")
    return value


def _transform_specs(specs: Any, where: str = "") -> None:
    for index, spec in enumerate(specs):
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise _problem(f"entry {where}[{index}] {show(spec)} names no transform (each entry is a mapping "
                           "such as {name: HorizontalFlip, p: 0.5})")
        children = spec.get("transforms")
        if children is not None:
            if not isinstance(children, (list, tuple)):
                raise _problem(f"entry {where}[{index}].transforms {show(children)} is not a list of transforms")
            _transform_specs(children, f"{where}[{index}].transforms")


def _augment_pipeline(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value in AUGMENT_PRESETS):
        return value
    if isinstance(value, (list, tuple)):
        _transform_specs(value)
        return value
    hint = suggestion(value, AUGMENT_PRESETS)
    raise _problem(f"{show(value)} is not a preset ({_one_of(AUGMENT_PRESETS)}) or a list of "
                   f"{{name: Transform, ...}} mappings{hint}")


# -- field types --------------------------------------------------------------------------------------
Count = Annotated[int, Field(ge=1)]  # at least 1
Natural = Annotated[int, Field(ge=0)]  # 0 or more
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
Fraction = Annotated[float, Field(gt=0, le=1)]  # a share that cannot be empty
Name = Annotated[str, Field(min_length=1)]
SizePair = Annotated[Any, BeforeValidator(_size_pair)]
FreeForm = Optional[dict]  # a builder's keyword arguments: checked by the builder, not here


class Section(BaseModel):
    """A config section: every key typed, none unknown, no value coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class DatasetSection(Section):
    name: Name
    layout: Name
    root: Optional[str]
    train: Optional[str]
    masks: Optional[str]
    test: Optional[str]
    sample_submission: Optional[str]
    solution: Optional[str]
    demo: bool
    pseudo: Optional[str]
    options: FreeForm
    demo_args: FreeForm = None  # read by the demo writer; not in _base.yaml


class PreprocessSection(Section):
    mode: choice(PREPROCESS_MODES)
    size: Optional[SizePair]
    channels: choice((1, 3))
    weight_map: choice(WEIGHT_MAPS)
    class_weights: choice(CLASS_WEIGHTS)
    w0: NonNegative
    sigma: Positive
    n_jobs: Annotated[int, BeforeValidator(_nonzero_jobs)]
    backend: Name
    on_error: choice(ON_ERROR)
    strict_labels: bool
    intensity: choice(INTENSITY_POLICIES)
    modality: choice(MODALITIES)
    cache_dir: Name
    progress: bool


class AugmentSection(Section):
    pipeline: Annotated[Any, BeforeValidator(_augment_pipeline)]
    seeding: choice(AUGMENT_SEEDINGS)


class GeneratorSection(Section):
    batch_size: Count
    crop_size: Optional[SizePair]
    targets: Annotated[Any, BeforeValidator(_targets)]
    border_width: Count
    workers: Count
    use_multiprocessing: bool
    max_queue_size: Count
    seed: Natural


class SplitSection(Section):
    n_folds: Annotated[int, Field(ge=2)]
    fold: Natural
    seed: Natural
    near_duplicates: bool


class ModelSection(Section):
    name: Name
    args: FreeForm


class DetectionSection(Section):
    input_size: SizePair
    iou_threshold: Fraction
    crop_scale: Annotated[Any, BeforeValidator(_fraction_range)]
    min_visibility: Probability
    loss: choice(DETECTION_LOSSES)
    loss_args: FreeForm
    nms_iou: Fraction
    score_threshold: Probability
    max_detections: Count
    max_instances: Count
    rois_per_image: Count
    positive_fraction: Fraction
    mask_threshold: Probability


class PostprocessSection(Section):
    method: choice(POSTPROCESS_METHODS, "postprocess.method")
    threshold: Probability
    min_size: Natural
    marker_threshold: Probability
    second_channel: choice(SECOND_CHANNELS)
    empty_threshold: Optional[Probability]


class TrainSection(Section):
    epochs: Count
    steps_per_epoch: Optional[Count]
    loss: Annotated[Any, BeforeValidator(_loss)]
    loss_args: FreeForm
    learning_rate: Positive
    schedule: choice(SCHEDULES, "train.schedule")
    plateau_patience: Natural
    cycle_epochs: Natural
    early_stopping: Natural
    score_every: Count
    image_every: Count
    metric: choice(TRAIN_METRICS)
    score_class: Natural
    seed: Natural
    deterministic: bool
    strategy: choice(STRATEGIES)
    mixed_precision: Annotated[Any, BeforeValidator(_precision)]
    ema: Annotated[float, Field(ge=0, lt=1)]
    average_checkpoints: Natural
    average_from: choice(AVERAGE_FROM, "train.average_from")
    freeze_encoder_epochs: Natural
    encoder_lr: NonNegative
    freeze_batchnorm: bool
    deep_supervision_weight: Annotated[Any, BeforeValidator(_head_weights)]
    classification_weight: NonNegative
    xla: bool
    runs_dir: Name
    verbose: choice(VERBOSITY)


class PredictSection(Section):
    checkpoint: choice(CHECKPOINTS, "predict.checkpoint")
    tta: Annotated[Any, BeforeValidator(_tta)]
    tile_size: Optional[Count]
    tile_overlap: Natural
    batch_size: Count


class SubmissionSection(Section):
    format: choice(lambda: tuple(FORMATS))
    num_classes: Optional[Count]
    dir: Name
    competition: Optional[str]
    sheet_images: Natural
    on_error: choice(ON_ERROR)


class PipelineConfig(Section):
    """A whole resolved config (``pipeline`` is the file it came from, added by load_config)."""

    dataset: DatasetSection
    preprocess: PreprocessSection
    augment: AugmentSection
    generator: GeneratorSection
    split: SplitSection
    model: ModelSection
    detection: DetectionSection
    postprocess: PostprocessSection
    train: TrainSection
    predict: PredictSection
    submission: SubmissionSection
    pipeline: Optional[str] = None


# -- messages ---------------------------------------------------------------------------------------
def _key_path(loc: Sequence[Any]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The section model holding the key at ``loc`` (None past a non-model field)."""
    model: type[BaseModel] | None = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _number(value: Any) -> str:
    return show(value) if not isinstance(value, float) or not value.is_integer() else f"{value:g}"


# pydantic's range errors: (how the message words the bound, the bound's key in the error context).
BOUNDS = {"greater_than_equal": ("at least", "ge"), "greater_than": ("greater than", "gt"),
          "less_than_equal": ("at most", "le"), "less_than": ("less than", "lt")}


def _message(error: Mapping[str, Any], source: str) -> str:
    kind, value, ctx, loc = error["type"], error.get("input"), error.get("ctx") or {}, error["loc"]
    if kind == "kseg":
        return error["msg"]
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{show(value)} is not an integer"
    if kind in ("float_type", "float_parsing"):
        return f"{show(value)} is not a number"
    if kind == "finite_number":
        return f"must be a finite number (got {show(value)})"
    if kind in ("bool_type", "bool_parsing"):
        return f"{show(value)} is not a boolean (true or false)"
    if kind == "string_type":
        quoted = f' (quote it: "{value}")' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        return f"{show(value)} is not a string{quoted}"
    if kind == "string_too_short":
        return f"must not be empty (got {show(value)})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"{show(value)} is not a mapping"
    if kind in BOUNDS:
        words, bound = BOUNDS[kind]
        return f"must be {words} {_number(ctx[bound])} (got {show(value)})"
    if kind == "missing":
        return f"missing (no value in {source} or the files it inherits)"
    if kind == "extra_forbidden":
        model = _model_at(loc)
        known = sorted(model.model_fields) if model is not None else []
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        hint = suggestion(str(loc[-1]), known)
        return (f"unknown key{hint}, written in {source} or a file it inherits "
                f"(keys of {where}: {', '.join(known)})")
    return f"{error['msg']} (got {show(value)})"


def _cross_checks(data: Mapping[str, Any], bad: set[tuple]) -> list[tuple[tuple, str]]:
    """Rules between keys of one section, checked only where each key on its own is valid."""
    found: list[tuple[tuple, str]] = []

    def section(name: str) -> Mapping[str, Any]:
        value = data.get(name)
        return value if isinstance(value, Mapping) else {}

    def valid(*loc: str) -> bool:
        return not any(loc[: len(b)] == b[: len(loc)] for b in bad) and loc[0] in data

    pre = section("preprocess")
    if valid("preprocess", "mode") and valid("preprocess", "size") and pre.get("mode") != "none" \
            and not pre.get("size"):
        found.append((("preprocess", "size"), f"preprocess.mode {pre.get('mode')} needs [height, width] (got null)"))
    split = section("split")
    if valid("split", "fold") and valid("split", "n_folds") and split.get("fold", 0) >= split.get("n_folds", 2):
        found.append((("split", "fold"), f"must be 0..{split['n_folds'] - 1}, below split.n_folds "
                                         f"({split['n_folds']}) (got {split['fold']})"))
    train = section("train")
    frozen, epochs = train.get("freeze_encoder_epochs", 0), train.get("epochs")
    if valid("train", "freeze_encoder_epochs") and valid("train", "epochs") and frozen and frozen >= epochs:
        found.append((("train", "freeze_encoder_epochs"),
                      f"must be below train.epochs ({epochs}), or the encoder never trains (got {frozen}); "
                      "train.encoder_lr: 0 keeps it frozen for the whole run"))
    predict = section("predict")
    tile, overlap = predict.get("tile_size"), predict.get("tile_overlap")
    if valid("predict", "tile_size") and valid("predict", "tile_overlap") and tile is not None and overlap >= tile:
        found.append((("predict", "tile_overlap"), f"must be below predict.tile_size ({tile}) (got {overlap})"))
    return found


def _in_base(loc: Sequence[Any], base: Mapping[str, Any]) -> bool:
    node: Any = base
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def problems(data: Mapping[str, Any], source: str = "the config") -> list[str]:
    """Every problem of a resolved config, one ``key.path: what is wrong`` line each (empty: valid).

    The shipped ``_base.yaml`` decides which keys exist: a key it sets is required, and one it sets
    that no section model declares yet is accepted unchecked (tests/core/test_schema.py keeps the
    two in step)."""
    if not isinstance(data, Mapping):
        return [f"the config is not a mapping (got {show(data)})"]
    base = load_raw(PIPELINES_DIR / BASE_NAME)
    found: list[tuple[tuple, str]] = []
    try:
        PipelineConfig.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            if error["type"] in ("missing", "extra_forbidden") and _in_base(loc, base) != (error["type"] == "missing"):
                continue  # a key the base does not set is optional; one it sets is known
            found.append((loc, _message(error, source)))
    found += _cross_checks(data, {loc for loc, _ in found})
    lines, seen = [], set()
    for loc, message in found:
        if loc not in seen:  # one line per key
            seen.add(loc)
            lines.append(f"{_key_path(loc)}: {message}" if loc else message)
    return lines


def validate_config(data: dict, source: str) -> None:
    """Raise :class:`ConfigError` listing every problem of ``data`` (read from ``source``), one
    line each, e.g. ``train.epochs: 'abc' is not an integer``."""
    lines = problems(data, source)
    if lines:
        raise ConfigError("\n".join(lines))
