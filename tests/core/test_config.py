"""Pipeline configs: base inheritance, overrides, the dataset registry, frozen values."""

import pytest

from kseg.core.config import (
    Config,
    apply_overrides,
    load_config,
    registry,
    resolve_pipeline,
)
from kseg.core.errors import ConfigError


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def pipelines(tmp_path):
    write(tmp_path / "_base.yaml", "dataset: {name: custom, root: null}\ntrain: {epochs: 10, lr: 0.001}\n"
                                   "model: {name: unet, args: {depth: 4}}\n")
    write(tmp_path / "toy.yaml", "dataset: {name: toy, root: data/toy}\ntrain: {epochs: 3}\n")
    write(tmp_path / "toy_fcn.yaml", "base: toy.yaml\nmodel: {name: fcn}\n")
    return tmp_path


def test_base_chain_merges_deeply(pipelines):
    cfg = load_config("toy", directory=pipelines)
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.001
    assert cfg.model.name == "unet" and cfg.model.args.depth == 4
    fcn = load_config("toy", model="fcn", directory=pipelines)
    assert fcn.model.name == "fcn" and fcn.train.epochs == 3
    # The U-Net's arguments do not leak into another builder (fcn has no ``depth``).
    assert fcn.model.args.to_dict() == {}


def test_another_builder_keeps_only_its_own_arguments(pipelines):
    write(pipelines / "toy_fcn.yaml", "base: toy.yaml\nmodel: {name: fcn, args: {variant: 8s}}\n")
    assert load_config("toy", model="fcn", directory=pipelines).model.args.to_dict() == {"variant": "8s"}
    # Same builder: arguments merge as every other section does.
    write(pipelines / "wide.yaml", "base: toy.yaml\ndataset: {name: wide}\nmodel: {args: {base_filters: 32}}\n")
    assert load_config("wide", directory=pipelines).model.args.to_dict() == {"depth": 4, "base_filters": 32}
    # MODEL= naming a builder without its own pipeline starts from that builder's defaults.
    assert load_config("toy", model="segnet", directory=pipelines).model.args.to_dict() == {}


def test_registry_lists_dataset_model_pairs(pipelines):
    assert set(registry(pipelines)) == {("toy", "unet"), ("toy", "fcn")}


def test_model_without_its_own_pipeline_overrides_the_name(pipelines):
    path, override = resolve_pipeline("toy", "segnet", pipelines)
    assert path.name == "toy.yaml" and override
    assert load_config("toy", model="segnet", directory=pipelines).model.name == "segnet"


def test_without_model_the_default_builder_wins_over_variants(pipelines):
    # The FCN variant's file sorts first; DATASET=toy alone must still mean the U-Net pipeline.
    (pipelines / "toy_fcn.yaml").rename(pipelines / "a_toy_fcn.yaml")
    assert resolve_pipeline("toy", None, pipelines) == (pipelines / "toy.yaml", False)
    assert resolve_pipeline("toy", "fcn", pipelines) == (pipelines / "a_toy_fcn.yaml", False)
    assert resolve_pipeline("dsb2018")[0].name == "dsb2018_unet.yaml"


def test_unknown_dataset_lists_known_ones(pipelines):
    with pytest.raises(ConfigError, match="unknown dataset 'nope'.*toy"):
        load_config("nope", directory=pipelines)


def test_overrides_parse_yaml_values_and_data_root(pipelines):
    cfg = load_config("toy", overrides=["train.epochs=7", "train.lr=1e-2", "model.args.filters=[8, 16]"],
                      data_root="/tmp/elsewhere", directory=pipelines)
    assert cfg.train.epochs == 7 and cfg.train.lr == pytest.approx(0.01)
    assert cfg.model.args.filters == (8, 16)
    assert cfg.dataset.root == "/tmp/elsewhere"


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "'epoch' is not a key of train"),
    ("trian.epochs=3", "'trian' is not a key of the top level"),
    ("train.epochs", "not of the form"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides({"train": {"epochs": 1}}, [override])


def test_config_is_frozen_and_round_trips(tmp_path, pipelines):
    cfg = load_config("toy", directory=pipelines)
    with pytest.raises(TypeError):
        cfg["train"] = 1  # type: ignore[index]
    assert isinstance(cfg.train, Config)
    cfg.dump(tmp_path / "run" / "resolved.yaml")
    import yaml

    assert yaml.safe_load((tmp_path / "run" / "resolved.yaml").read_text()) == cfg.to_dict()
    assert cfg.fingerprint("train") == load_config("toy", directory=pipelines).fingerprint("train")
    assert cfg.fingerprint("train") != load_config("toy", overrides=["train.epochs=4"], directory=pipelines).fingerprint("train")


def test_project_pipelines_resolve():
    cfg = load_config("demo")
    assert cfg.dataset.name == "demo" and cfg.dataset.demo is True
    assert cfg.preprocess.sigma == 5.0


# -- paths belong to the user ---------------------------------------------------------------------
def test_a_users_own_yaml_inherits_the_shipped_base_and_resolves_its_root_beside_itself(tmp_path, monkeypatch):
    from kseg.core.config import load_config

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "pipe.yaml").write_text("dataset:\n  name: mine\n  layout: paired\n  root: images_here\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(folder / "pipe.yaml"))
    assert cfg.dataset.root == str(folder.resolve() / "images_here")  # beside the file, not the cwd
    assert cfg.train.epochs == 30 and cfg.postprocess.min_size == 8  # from the shipped _base.yaml
    assert cfg.train.runs_dir == str(tmp_path / "runs")  # the user's working directory
    assert cfg.preprocess.cache_dir == str(tmp_path / "cache")


def test_shipped_pipelines_resolve_against_the_working_directory_or_kseg_home(tmp_path, monkeypatch):
    from kseg.core.config import load_config

    monkeypatch.delenv("KSEG_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo")
    assert cfg.dataset.root == str(tmp_path / "data" / "demo") and cfg.train.runs_dir == str(tmp_path / "runs")
    assert load_config("demo", data_root="elsewhere").dataset.root == str(tmp_path / "elsewhere")
    monkeypatch.setenv("KSEG_HOME", str(tmp_path / "home"))
    cfg = load_config("demo")
    assert cfg.dataset.root == str(tmp_path / "home" / "data" / "demo")
    assert cfg.submission.dir == str(tmp_path / "home" / "submissions")
    assert load_config("demo", overrides=["train.runs_dir=/abs/runs"]).train.runs_dir == "/abs/runs"
