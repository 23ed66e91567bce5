"""``python -m kseg COMMAND``: the command line behind the Makefile targets."""

from __future__ import annotations

import argparse
import sys
import time

from kseg.errors import KsegError


def _add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="demo", help="registered dataset name or a pipeline YAML path")
    parser.add_argument("--model", default=None, help="model name (picks the dataset's pipeline for it)")
    parser.add_argument("--data", default=None, help="dataset root folder (overrides dataset.root)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=5 (repeatable)")


def _config(args):
    from kseg.config import load_config

    return load_config(args.dataset, model=args.model, overrides=args.overrides, data_root=args.data)


def cmd_demo_data(args) -> int:
    from kseg.config import project_path
    from kseg.io.demo import write_demo_dataset

    root = write_demo_dataset(project_path(args.out), seed=args.seed, overwrite=args.overwrite)
    print(f"demo competition ready in {root}")
    return 0


def cmd_preprocess(args) -> int:
    from kseg.pipeline import preprocess_train

    start = time.perf_counter()
    data = preprocess_train(_config(args))
    print(f"{len(data)} samples preprocessed in {time.perf_counter() - start:.1f} s -> {data.directory}")
    return 0


def cmd_demo(args) -> int:
    """The data path end to end: demo data, cached preprocessing, one epoch of augmented batches."""
    from tqdm.auto import tqdm

    from kseg.config import project_path
    from kseg.pipeline import kfold_split, make_batches, preprocess_train, strata

    cfg = _config(args)
    start = time.perf_counter()
    data = preprocess_train(cfg)
    prep_s = time.perf_counter() - start
    groups = strata(data, project_path(cfg.dataset.root))
    train_ids, valid_ids = kfold_split(data.ids, cfg.split.n_folds, cfg.split.fold, cfg.split.seed, groups)
    train, valid = make_batches(cfg, data, train_ids, valid_ids)
    start = time.perf_counter()
    n_images = 0
    for index in tqdm(range(len(train)), desc="augmented batches", unit="batch", file=sys.stderr):
        x, y, w = train[index]
        n_images += len(x)
    gen_s = time.perf_counter() - start
    print(f"dataset {cfg.dataset.name}: {len(data)} samples ({data.kind}), cache {data.directory}")
    print(f"preprocessing: {prep_s:.2f} s; fold {cfg.split.fold}/{cfg.split.n_folds}: "
          f"{len(train_ids)} train, {len(valid_ids)} validation")
    print(f"one epoch of augmented batches: {n_images} crops of {x.shape[1]}x{x.shape[2]} in {gen_s:.2f} s "
          f"({n_images / max(gen_s, 1e-9):.0f} images/s); targets {cfg.generator.targets} -> {y.shape[-1]} channel(s)")
    return 0


def cmd_train(args) -> int:
    """Train a model; prints the validation score next to the classical baseline."""
    from kseg.training import train

    result = train(_config(args))
    print(f"run: {result.run_dir}")
    print(f"{result.monitor} (best checkpoint): {result.val_score:.4f}")
    names = {"otsu": "classical baseline (Otsu threshold; + connected components for instances)",
             "all_foreground": "trivial prediction (every pixel foreground)"}
    for key, value in result.baselines.items():
        print(f"{names.get(key, key)} on the same split: {value:.4f}")
    print(f"time: {result.seconds / 60:.1f} min")
    return 0


def cmd_models(args) -> int:
    from kseg.models import list_models

    print("\n".join(list_models()))
    return 0


def cmd_datasets(args) -> int:
    from kseg.config import registry

    for (dataset, model), path in sorted(registry().items()):
        print(f"{dataset:16s} {model or '-':10s} {path.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kseg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo_data = commands.add_parser("demo-data", help="write the synthetic demo competition")
    demo_data.add_argument("--out", default="data/demo")
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.add_argument("--overwrite", action="store_true")
    demo_data.set_defaults(func=cmd_demo_data)

    for name, func, text in (
        ("preprocess", cmd_preprocess, "preprocess a dataset into the cache"),
        ("demo", cmd_demo, "run the data path on a dataset: preprocessing + one epoch of batches"),
        ("train", cmd_train, "train a model (resumes an unfinished run of the same config)"),
    ):
        sub = commands.add_parser(name, help=text)
        _add_pipeline_options(sub)
        sub.set_defaults(func=func)

    commands.add_parser("datasets", help="list registered pipelines").set_defaults(func=cmd_datasets)
    commands.add_parser("models", help="list registered model builders").set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
