"""Config validation: types, ranges and choices checked when a config loads, one line per problem."""

import copy

import pytest
import yaml

from kseg.core import schema
from kseg.core.config import PIPELINES_DIR, load_config, load_raw, registry
from kseg.core.errors import ConfigError
from kseg.core.schema import validate_config


def load_error(*overrides: str, dataset: str = "demo") -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(dataset, overrides=list(overrides))
    return str(caught.value)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "train.epochs: 'abc' is not an integer"),
    ("train.epochs=0", "train.epochs: must be at least 1 (got 0)"),
    ("generator.batch_size=0", "generator.batch_size: must be at least 1 (got 0)"),
    ("postprocess.method=watershedd",
     "postprocess.method: 'watershedd' is not one of components, distance, markers (did you mean 'distance'?)"),
    ("train.epochs=2.5", "train.epochs: 2.5 is not an integer"),
    ("dataset.demo=1", "dataset.demo: 1 is not a boolean (true or false)"),
    ("train.xla=maybe", "train.xla: 'maybe' is not a boolean (true or false)"),
    ("train.learning_rate=0", "train.learning_rate: must be greater than 0 (got 0)"),
    ("train.learning_rate=abc", "train.learning_rate: 'abc' is not a number"),
    ("postprocess.threshold=1.5", "postprocess.threshold: must be at most 1 (got 1.5)"),
    ("preprocess.channels=2", "preprocess.channels: 2 is not one of 1, 3"),
    ("train.strategy=mirror",
     "train.strategy: 'mirror' is not one of auto, default, mirrored (did you mean 'mirrored'?)"),
    ("generator.crop_size=[0,64]",
     "generator.crop_size: must be [height, width], two integers of at least 1 (got [0, 64])"),
    ("generator.targets=mask+edge",
     "generator.targets: 'mask+edge' names an unknown target 'edge'; targets: mask | border | center joined "
     "with '+' (e.g. 'mask+border'), or 'classes'"),
    ("predict.tta=flipz",
     "predict.tta: 'flipz' is not a preset (none, flips, rotations, d4) or a list of identity, flip_h, flip_v, "
     "rot90, rot180, rot270, transpose, transverse (did you mean 'flips'?)"),
    ("split.fold=5", "split.fold: must be 0..4, below split.n_folds (5) (got 5)"),
    ("preprocess.mode=resize", "preprocess.size: preprocess.mode resize needs [height, width] (got null)"),
    ("predict.tile_overlap=512", "predict.tile_overlap: must be below predict.tile_size (512) (got 512)"),
    ("dataset.train=2018", 'dataset.train: 2018 is not a string (quote it: "2018")'),
    ("model.args=3", "model.args: 3 is not a mapping"),
    ("train.learning_rate=nan", "train.learning_rate: must be a finite number (got nan)"),
])
def test_each_problem_is_one_line_naming_the_key_and_what_is_allowed(override, message):
    assert load_error(override) == message


def test_a_format_name_lists_the_registered_formats_and_the_one_meant():
    message = load_error("submission.format=dsb")
    assert message.startswith("submission.format: 'dsb' is not one of dsb_instances, airbus_instances")
    assert message.endswith("(did you mean 'dsb_instances'?)") and "\n" not in message


def test_several_problems_are_all_listed_one_line_each():
    message = load_error("train.epochs=abc", "generator.batch_size=0", "postprocess.method=watershedd",
                         "train.deterministic=yes please", "predict.checkpoint=latest")
    assert sorted(message.splitlines()) == sorted([
        "train.epochs: 'abc' is not an integer",
        "generator.batch_size: must be at least 1 (got 0)",
        "postprocess.method: 'watershedd' is not one of components, distance, markers (did you mean 'distance'?)",
        "train.deterministic: 'yes please' is not a boolean (true or false)",
        "predict.checkpoint: 'latest' is not one of best, last, averaged, cycles (did you mean 'last'?)",
    ])


def test_valid_overrides_and_free_form_mappings_pass():
    cfg = load_config("demo", overrides=[
        "train.epochs=2", "train.steps_per_epoch=null", "predict.tta=[identity, rot90]", "predict.tile_size=null",
        "augment.pipeline=[{name: HorizontalFlip, p: 0.5}]", "model.args.anything=[1, x]", "train.loss_args.gamma=abc",
        "dataset.options.overlap=first", "generator.targets=classes"])
    assert cfg.train.epochs == 2 and cfg.model.args.anything == (1, "x")


@pytest.mark.parametrize("key", sorted(registry()), ids="/".join)
def test_every_shipped_pipeline_loads(key):
    dataset, model = key
    cfg = load_config(dataset, model=model)
    assert (cfg.dataset.name, cfg.model.name) == key
    assert schema.problems(load_raw(registry()[key])) == []


def test_a_users_yaml_with_an_unknown_or_wrong_key_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "mine.yaml"
    path.write_text("dataset: {name: mine, layout: paired, root: here}\ntrain: {epochz: 3, xla: 1}\n")
    lines = sorted(load_error(dataset=str(path)).splitlines())
    assert len(lines) == 2
    assert lines[0].startswith(f"train.epochz: unknown key (did you mean 'epochs'?), written in {path} or a file "
                               "it inherits (keys of train: ")
    assert lines[1] == "train.xla: 1 is not a boolean (true or false)"
    path.write_text("dataset: {name: mine, root: here}\npredict: null\ntrian: {epochs: 3}\n")
    lines = sorted(load_error(dataset=str(path)).splitlines())
    assert len(lines) == 2 and lines[0] == "predict: null is not a mapping"
    assert lines[1].startswith("trian: unknown key (did you mean 'train'?)")


def test_a_missing_key_is_named():
    data = load_raw(PIPELINES_DIR / "demo.yaml")
    del data["train"]["epochs"], data["predict"]
    with pytest.raises(ConfigError) as caught:
        validate_config(data, "pipelines/demo.yaml")
    assert str(caught.value).splitlines() == [
        "train.epochs: missing (no value in pipelines/demo.yaml or the files it inherits)",
        "predict: missing (no value in pipelines/demo.yaml or the files it inherits)",
    ]


def test_a_bad_override_fails_at_load_before_anything_is_read_or_written(tmp_path, monkeypatch, capsys):
    from kseg.app import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KSEG_HOME", raising=False)

    def not_reached(*args, **kwargs):
        raise AssertionError("training started with an invalid config")

    monkeypatch.setattr(cli, "train", not_reached)
    monkeypatch.setattr(cli, "preprocess_train", not_reached)
    assert cli.main(["train", "--set", "train.epochs=abc"]) == 2
    assert capsys.readouterr().err.strip() == "error: train.epochs: 'abc' is not an integer"
    assert list(tmp_path.iterdir()) == []  # no runs/, cache/ or data/ folder


def test_a_saved_run_config_loads_without_the_strict_check(tmp_path):
    from kseg.core.runs import CONFIG, run_config

    saved = load_config("demo").to_dict()
    saved["train"]["retired_key"] = 1  # a key an older version wrote
    (tmp_path / CONFIG).write_text(yaml.safe_dump(saved))
    assert run_config(tmp_path).train.retired_key == 1
    assert "train.retired_key: unknown key" in "\n".join(schema.problems(copy.deepcopy(saved)))


def test_choice_lists_equal_the_code_constants():
    from kseg.core.formats import FORMATS
    from kseg.data import augment, preprocess
    from kseg.engine.distribute import STRATEGIES
    from kseg.io import intensity
    from kseg.metrics.scores import METRICS
    from kseg.tasks.base import CHECKPOINTS
    from kseg.tasks.semantic import postprocess, predictor, targets
    from kseg.tasks.semantic.losses import LOSS_NAMES
    from kseg.tasks.ssd.model import MultiboxLossLayer

    assert schema.POSTPROCESS_METHODS == postprocess.METHODS
    assert schema.LOSS_NAMES == LOSS_NAMES
    assert schema.STRATEGIES == STRATEGIES
    assert schema.TTA_PRESETS == tuple(predictor.TTA_PRESETS)
    assert schema.TTA_TRANSFORMS == predictor.TRANSFORMS
    assert schema.PREPROCESS_MODES == preprocess.MODES
    assert schema.WEIGHT_MAPS == preprocess.WEIGHT_MAPS
    assert schema.INTENSITY_POLICIES == intensity.POLICIES
    assert schema.AUGMENT_PRESETS == tuple(augment.PRESETS)
    assert schema.TARGET_CHANNELS == targets.CHANNEL_NAMES and schema.TARGET_CLASSES == targets.CLASSES
    assert schema.DETECTION_LOSSES == tuple(MultiboxLossLayer.LOSSES)
    assert schema.METRICS == METRICS
    assert schema.CHECKPOINTS == CHECKPOINTS
    assert set(schema.PostprocessSection.model_fields) == set(postprocess.POSTPROCESS_KEYS)
    # Formats are read from the registry when a config is checked, not copied.
    assert all(schema.problems({**load_raw(PIPELINES_DIR / "demo.yaml"),
                                "submission": {**load_raw(PIPELINES_DIR / "demo.yaml")["submission"], "format": name}})
               == [] for name in FORMATS)


def test_every_key_of_the_base_is_declared_and_nothing_more():
    base = load_raw(PIPELINES_DIR / "_base.yaml")
    assert set(schema.PipelineConfig.model_fields) == set(base) | {"pipeline"}
    for name, section in base.items():
        declared = schema.PipelineConfig.model_fields[name].annotation.model_fields
        required = {key for key, field in declared.items() if field.is_required()}
        assert required == set(section), name  # every key the base sets is required, no other


def test_the_shipped_base_decides_which_keys_exist(monkeypatch):
    # A key added to _base.yaml before its section model declares it is accepted (unchecked); a
    # declared key the base no longer sets is optional. The test above keeps the two in step.
    base = load_raw(PIPELINES_DIR / "_base.yaml")
    base["train"]["new_setting"] = "x"
    del base["train"]["xla"]
    monkeypatch.setattr(schema, "load_raw", lambda path: copy.deepcopy(base))
    data = load_raw(PIPELINES_DIR / "demo.yaml")
    data["train"]["new_setting"] = [1]
    del data["train"]["xla"]
    assert schema.problems(data) == []
    data["train"]["xla"] = "no"
    assert schema.problems(data) == ["train.xla: 'no' is not a boolean (true or false)"]
