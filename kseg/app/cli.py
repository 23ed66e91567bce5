"""``kseg COMMAND`` (or ``python -m kseg COMMAND``): the command line behind the Makefile targets."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import keras
from tqdm.auto import tqdm

from kseg import __version__
from kseg.app.cv import OOF_SCORES, cross_validate, submission_runs, tune_cv
from kseg.app.evaluate import evaluate_submission
from kseg.app.predict import PROBABILITIES_SUFFIX, predict_images
from kseg.app.pseudo import HIGH, LOW, MIN_CONFIDENT, pseudo_round
from kseg.app.tune import tune_postprocess
from kseg.core import runs
from kseg.core.config import Config, load_config, project_path, registry
from kseg.core.errors import ConfigError, KsegError
from kseg.core.fileio import atomic_write_text
from kseg.core.runs import newest_run, run_config
from kseg.data.pipeline import preprocess_train
from kseg.data.split import dataset_split
from kseg.engine.fit import train
from kseg.io.demo import write_demo_dataset
from kseg.io.sample import preview
from kseg.io.testset import discover_test_ids
from kseg.nn.backbones import ENCODERS, get_encoder_spec
from kseg.nn.hub_encoders import HUB_PREFIX, is_hub_encoder
from kseg.nn.registry import build_model, get_model_entry, list_models
from kseg.submission.formats import FORMATS, get_format
from kseg.submission.kaggle import kaggle_submit
from kseg.submission.make import make_submission
from kseg.submission.reading import image_sizes
from kseg.submission.validation import validate_submission
from kseg.tasks.semantic.batches import make_batches


def _add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="demo", help="registered dataset name or a pipeline YAML path")
    parser.add_argument("--model", default=None, help="model name (picks the dataset's pipeline for it)")
    parser.add_argument("--data", default=None, help="dataset root folder (overrides dataset.root)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=5 (repeatable)")


def _config(args):
    return load_config(args.dataset, model=args.model, overrides=args.overrides, data_root=args.data)


def cmd_demo_data(args) -> int:
    root = write_demo_dataset(project_path(args.out), seed=args.seed, overwrite=args.overwrite)
    print(f"demo competition ready in {root}")
    return 0


def cmd_preprocess(args) -> int:
    start = time.perf_counter()
    data = preprocess_train(_config(args))
    print(f"{len(data)} samples preprocessed in {time.perf_counter() - start:.1f} s -> {data.directory}")
    return 0


def cmd_demo(args) -> int:
    """The data path end to end: demo data, cached preprocessing, one epoch of augmented batches."""

    cfg = _config(args)
    start = time.perf_counter()
    data = preprocess_train(cfg)
    prep_s = time.perf_counter() - start
    train_ids, valid_ids = dataset_split(cfg, data)
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
    """Train a model; prints the validation score next to the classical and trivial baselines."""
    result = train(_config(args))
    print(f"run: {result.run_dir}")
    print(f"{result.monitor} (best checkpoint): {result.val_score:.4f}")
    names = {"otsu": "classical baseline (Otsu threshold; + connected components for instances)",
             "all_foreground": "trivial prediction (every pixel foreground)",
             "empty": "trivial prediction (nothing: no object, an empty mask)",
             "otsu_map50": "classical baseline (Otsu + connected-component boxes), VOC mAP@0.5",
             "otsu_coco_map": "classical baseline (Otsu + connected-component boxes), COCO mAP@[.5:.95]"}
    for key, value in result.baselines.items():
        print(f"{names.get(key, key)} on the same split: {value:.4f}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"time: {result.seconds / 60:.1f} min")
    return 0


def cmd_cv(args) -> int:
    """Train every fold (resuming), keep the out-of-fold predictions and score them."""
    numbers = [int(v) for v in args.folds.split(",")] if args.folds else None
    devices = [d for d in args.devices.split(",") if d.strip()] if args.devices else None
    result = cross_validate(_config(args), folds=numbers, jobs=args.jobs, devices=devices,
                            progress=not getattr(args, "quiet", False))
    print(f"cv folder: {result.folder}")
    print_oof(result.scores)
    return 0


def cmd_pseudo(args) -> int:
    """Pseudo-label a test folder with a CV folder's folds, then a CV round on train + pseudo-labels."""
    numbers = [int(v) for v in args.folds.split(",")] if args.folds else None
    before = json.loads((Path(args.cv) / OOF_SCORES).read_text()) if (Path(args.cv) / OOF_SCORES).is_file() else None
    result = pseudo_round(args.cv, args.test_dir, low=args.low, high=args.high, min_confident=args.min_confident,
                          overrides=args.overrides, folds=numbers, jobs=args.jobs, progress=not args.quiet)
    print(f"cv folder with pseudo-labels: {result.folder}")
    print_oof(result.scores)
    if before is not None:
        print(f"out-of-fold {before['metric']} before pseudo-labels: {before['score']:.4f} "
              f"({result.scores['score'] - before['score']:+.4f})")
    return 0


def print_oof(scores: dict) -> None:
    print(f"out-of-fold {scores['metric']} on {scores['images']} images ({scores['checkpoint']} checkpoints, "
          f"post-processing {scores['postprocess']}): {scores['score']:.4f}; Otsu on the same images "
          f"{scores['otsu']:.4f}")
    for name, kind in (("folds", "fold"), ("groups", "group")):
        for key, entry in scores[name].items():
            print(f"  {kind} {key}: {entry['score']:.4f} (Otsu {entry['otsu']:.4f}) on {entry['images']} images")


def _takes_encoder(model: str) -> bool:
    return "encoder" in inspect.signature(get_model_entry(model).builder).parameters


def _names(values: list[str]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def cmd_models(args) -> int:
    """The registered models and the encoders; ``--params`` builds every model x encoder pair."""
    if not args.params:
        print("models (model.name; 'encoder': takes model.args.encoder):")
        for name in list_models():
            print(f"  {name:16s} {get_model_entry(name).task:10s} {'encoder' if _takes_encoder(name) else ''}".rstrip())
        print("encoders (model.args.encoder; each takes [0, 1] images and normalises them inside):")
        for name, spec in sorted(ENCODERS.items()):
            strides = ", ".join(map(str, sorted(spec.features)))
            print(f"  {name:24s} keras.applications.{spec.constructor:18s} strides {strides:18s} "
                  f"input {spec.scaling}")
        print(f"  {HUB_PREFIX + '<folder>':24s} a keras-hub backbone preset on local disk "
              "(pip install 'kseg[hub]')")
        return 0
    models = _names(args.model) or list_models()
    encoders = _names(args.encoder) or ["none", *sorted(ENCODERS)]
    for encoder in encoders:
        if encoder != "none" and not is_hub_encoder(encoder):
            get_encoder_spec(encoder)  # unknown names fail before any build
    size = int(args.size)
    print(f"{'model':16s} {'encoder':24s} parameters at {size}x{size}x3", flush=True)
    for model in models:
        takes_encoder = _takes_encoder(model)
        for encoder in encoders:
            if encoder != "none" and not takes_encoder:
                continue
            options = {"input_shape": (size, size, 3)} | ({} if encoder == "none" else {"encoder": encoder})
            try:
                count = f"{build_model(model, **options).count_params():,}"
            except KsegError as exc:
                count = f"n/a ({exc})"
            keras.backend.clear_session()  # each build starts from an empty graph and frees the last
            print(f"{model:16s} {encoder:24s} {count}", flush=True)
    return 0


def cmd_datasets(args) -> int:
    for (dataset, model), path in sorted(registry().items()):
        print(f"{dataset:16s} {model or '-':10s} {path.name}")
    return 0


def _runs_dir(args) -> str:
    """Where runs live: a ``--set train.runs_dir=...`` override, else the dataset pipeline's, else runs/."""
    for item in reversed(args.overrides):
        key, _, value = item.partition("=")
        if key.strip() == "train.runs_dir" and value.strip():
            return value.strip()
    if args.dataset:
        return str(load_config(args.dataset).train.runs_dir)
    return "runs"


def _find_runs(args) -> list:
    """The run directories named by ``--run`` (repeatable, or comma-separated), else the newest
    finished run (of ``--dataset`` when given)."""

    named = [Path(p) for item in args.run for p in item.split(",") if p.strip()]
    if named:
        for path in named:
            if not (path / runs.CONFIG).is_file():
                raise ConfigError(f"{path} is not a run directory (no config.yaml); runs are "
                                  "runs/<dataset>-<model>-<time>")
        return named
    runs_dir = _runs_dir(args)
    model = getattr(args, "model", None)
    pattern = f"{args.dataset or '*'}-{model}-*" if model else (f"{args.dataset}-*" if args.dataset else "*")
    run = newest_run(runs_dir, pattern=pattern)
    if run is None:
        which = (f"of dataset {args.dataset!r} " if args.dataset else "") + (f"of model {model!r} " if model else "")
        raise ConfigError(f"no finished run {which}in {project_path(runs_dir)}: train one (make train) or pass RUN=dir")
    return [run]


def _submission_config(args):
    """The config that names format, dataset root and test folder for validate/evaluate."""
    cfg = _config(args)
    if args.format:
        cfg = Config({**cfg.to_dict(), "submission": {**cfg.to_dict().get("submission", {}), "format": args.format}})
    return cfg


def _test_images(cfg, test_dir, sample, fmt):
    """``(id, path)`` of the test images (for RLE bounds), or [] when there is no test folder."""

    if test_dir is None:
        if not cfg.dataset.root or not cfg.dataset.test:
            return []
        test_dir = project_path(cfg.dataset.root) / cfg.dataset.test
    if not Path(test_dir).is_dir():
        return []
    return discover_test_ids(test_dir, sample, id_style=fmt.id_style)


def _config_file(cfg, key: str):
    name = cfg.dataset.get(key)
    if not name or not cfg.dataset.root:
        return None
    path = project_path(cfg.dataset.root) / name
    return path if path.is_file() else None


def _newest_submission(cfg):
    folder = project_path(cfg.submission.dir)
    files = sorted(folder.glob("*.csv"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not files:
        raise ConfigError(f"no submission CSV in {folder}: run make submit, or pass FILE=path")
    return files[0]


def cmd_submit(args) -> int:
    """Predict the test set with the newest (or given) run(s), write and validate the CSV."""

    overrides = list(args.overrides)
    if args.cv:
        run_dirs, overrides = submission_runs(Path(args.cv), overrides)
    else:
        run_dirs = _find_runs(args)
    result = make_submission(run_dirs, overrides=overrides, test_dir=args.test_dir, sample=args.sample,
                             out_dir=args.out_dir, data_root=args.data, progress=not args.quiet, output=args.output)
    report = result.report
    print(f"run(s): {', '.join(str(r) for r in result.runs)}")
    print(f"post-processing: {result.postprocess}")
    print(f"submission: {result.csv} ({report.rows} rows, {report.images} images, {report.objects} objects; valid)")
    if result.sheet:
        print(f"contact sheet: {result.sheet}")
    if args.kaggle:
        competition = run_config(run_dirs[0], overrides).submission.competition
        kaggle_submit(result.csv, competition, args.message or f"kseg {result.csv.stem}")
    return 0


def cmd_predict(args) -> int:
    """Predict images into PNG masks / label images with the newest (or given) run(s)."""
    result = predict_images(_find_runs(args), args.input, args.output, probabilities=args.probabilities,
                            overrides=args.overrides, progress=not args.quiet)
    images = sum(1 for p in result.written if p.suffix == ".png" and not p.stem.endswith(PROBABILITIES_SUFFIX))
    print(f"run(s): {', '.join(str(r) for r in result.runs)}")
    print(f"{images} image(s) predicted ({result.kind}) -> {result.output}")
    return 0


def cmd_validate(args) -> int:
    """Check a submission file: header, ids against the sample, strict RLE, overlaps."""

    cfg = _submission_config(args)
    fmt = get_format(cfg.submission.format)
    path = Path(args.file) if args.file else _newest_submission(cfg)
    sample = Path(args.sample) if args.sample else (None if args.test_dir else _config_file(cfg, "sample_submission"))
    items = _test_images(cfg, args.test_dir, sample, fmt)
    if not items:
        raise ConfigError("validation needs the test images (for image sizes): pass TEST_DIR=folder (--test-dir)")
    report = validate_submission(path, fmt, image_sizes(items), sample=sample, expected_ids=[i for i, _ in items])
    print(f"{path}: valid {fmt.name} submission ({report.rows} rows, {report.images} images, "
          f"{report.objects} objects)")
    return 0


def cmd_evaluate(args) -> int:
    """Score a submission against a ground-truth CSV with the competition metric."""

    cfg = _submission_config(args)
    fmt = get_format(cfg.submission.format)
    submission = Path(args.submission) if args.submission else _newest_submission(cfg)
    solution = args.solution or args.solution_option
    solution = Path(solution) if solution else _config_file(cfg, "solution")
    if solution is None:
        raise ConfigError(f"no solution CSV: pass SOLUTION=path (dataset {cfg.dataset.name!r} names none)")
    items = _test_images(cfg, args.test_dir, None, fmt)
    result = evaluate_submission(submission, solution, fmt, image_sizes(items), metric=args.metric,
                                 images=dict(items), intensity=cfg.preprocess.intensity)
    if args.per_image:
        atomic_write_text(args.per_image, result.per_image.to_csv(index=False))
        print(f"per-image scores: {args.per_image}")
    if args.verbose:
        print(result.per_image.to_string(index=False))
    if result.unscored:
        print(f"{len(result.unscored)} image(s) of {submission} are not in the solution and were not scored: "
              f"{preview(result.unscored)}")
    print(f"{result.metric} over {len(result.per_image)} images: {result.score:.6f}")
    for group, entry in result.groups.items():
        print(f"  {group}: {entry['score']:.6f} over {entry['images']} images")
    return 0


def _print_gate(record: dict) -> None:
    gate = record.get("gate")
    if gate:
        print(f"  classification gate: {gate['score']:.4f} with empty_threshold "
              f"{gate['params']['empty_threshold']} (ungated {gate['ungated_score']:.4f})")


def cmd_tune(args) -> int:
    """Tune post-processing on the run's validation split; saves runs/<run>/postprocess.json."""

    numbers = lambda text, kind: [kind(v) for v in text.split(",")] if text else None  # noqa: E731
    if args.cv:
        record = tune_cv(Path(args.cv), overrides=args.overrides, thresholds=numbers(args.thresholds, float),
                         min_sizes=numbers(args.min_sizes, int), empty_thresholds=numbers(args.empty_thresholds, float),
                         methods=args.methods.split(",") if args.methods else None, progress=not args.quiet)
        print(f"{record['metric']} on {record['images']} out-of-fold images of folds {record['folds']}: "
              f"{record['config_score']:.4f} with the config's post-processing, {record['score']:.4f} tuned")
        for method, entry in record["methods"].items():
            print(f"  best with {method}: {entry['score']:.4f} {entry['params']}")
        _print_gate(record)
        print(f"tuned post-processing: {record['params']} -> {Path(args.cv) / 'postprocess.json'}")
        print_oof(json.loads((Path(args.cv) / OOF_SCORES).read_text()))
        return 0
    run = _find_runs(args)[0]
    record = tune_postprocess(run, overrides=args.overrides, thresholds=numbers(args.thresholds, float),
                              min_sizes=numbers(args.min_sizes, int),
                              empty_thresholds=numbers(args.empty_thresholds, float),
                              methods=args.methods.split(",") if args.methods else None,
                              limit=args.limit, progress=not args.quiet)
    print(f"run: {run}")
    print(f"{record['metric']} on {record['images']} validation images: {record['config_score']:.4f} with the "
          f"config's post-processing, {record['score']:.4f} tuned")
    for method, entry in record["methods"].items():
        print(f"  best with {method}: {entry['score']:.4f} {entry['params']}")
    _print_gate(record)
    for group, entry in record["groups"].items():
        print(f"  image group {group}: {entry['score']:.4f} on {entry['images']} images (tuned)")
    print(f"tuned post-processing: {record['params']} -> {run / 'postprocess.json'}")
    return 0


def cmd_formats(args) -> int:
    rows = {"instance": "instance", "image": "image", "image_class": "image and class", "image_boxes": "image"}
    for fmt in FORMATS.values():
        layout = f"order {fmt.order}" if fmt.order else "boxes  "
        print(f"{fmt.name:17s} {','.join(fmt.columns):30s} one row per {rows[fmt.rows]:15s} "
              f"{layout}  {fmt.competition}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kseg {__version__}")
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

    cv = commands.add_parser("cv", help="train every fold (resuming), keep and score the out-of-fold predictions")
    _add_pipeline_options(cv)
    cv.add_argument("--folds", default=None, help="comma-separated folds to train (default: all split.n_folds)")
    cv.add_argument("--jobs", type=int, default=1, help="folds trained at once, as separate processes (default 1)")
    cv.add_argument("--devices", default=None,
                    help="comma-separated GPU ids: one fold job per GPU, each seeing only its own")
    cv.add_argument("--quiet", action="store_true", help="no progress bars")
    cv.set_defaults(func=cmd_cv)

    pseudo = commands.add_parser("pseudo", help="pseudo-label a test folder with a CV folder's folds, then train a "
                                                 "CV round on train + pseudo-labels")
    pseudo.add_argument("--cv", required=True, metavar="DIR", help="CV folder (make cv) whose folds label the images")
    pseudo.add_argument("--test-dir", required=True, metavar="DIR", help="unlabelled images (the dataset's layout)")
    pseudo.add_argument("--low", type=float, default=LOW, help=f"confident background at or below (default {LOW})")
    pseudo.add_argument("--high", type=float, default=HIGH, help=f"confident foreground at or above (default {HIGH})")
    pseudo.add_argument("--min-confident", type=float, default=MIN_CONFIDENT,
                        help=f"keep an image when this share of its pixels is confident (default {MIN_CONFIDENT})")
    pseudo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value of the new round, e.g. --set train.epochs=20 (repeatable)")
    pseudo.add_argument("--folds", default=None, help="comma-separated folds to train (default: all)")
    pseudo.add_argument("--jobs", type=int, default=1, help="folds trained at once, as separate processes")
    pseudo.add_argument("--quiet", action="store_true", help="no progress bars")
    pseudo.set_defaults(func=cmd_pseudo)

    def run_options(sub):
        sub.add_argument("--run", action="append", default=[], metavar="DIR",
                         help="run directory (repeat, or comma-separate, to average several runs, e.g. folds); "
                              "default: the newest finished run")
        sub.add_argument("--dataset", default=None, help="pick the newest finished run of this dataset")
        sub.add_argument("--model", default=None, help="pick the newest finished run of this model")
        sub.add_argument("--data", default=None, help="dataset root folder (overrides dataset.root)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a value of the run's config, e.g. --set predict.tta=d4 (repeatable)")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")

    submit = commands.add_parser("submit", help="predict the test set and write a validated submission CSV")
    run_options(submit)
    submit.add_argument("--test-dir", default=None, help="test images folder (default: the config's dataset.test)")
    submit.add_argument("--sample", default=None, help="sample submission CSV whose ids define the rows")
    submit.add_argument("--out-dir", default=None, help="folder for the CSV and PNG (default: submission.dir)")
    submit.add_argument("--output", default=None, metavar="CSV",
                        help="write exactly this CSV (e.g. /kaggle/working/submission.csv); the contact sheet "
                             "goes beside it as .png")
    submit.add_argument("--cv", default=None, metavar="DIR",
                        help="a CV folder (make cv): ensemble its folds with its out-of-fold-tuned post-processing")
    submit.add_argument("--kaggle", action="store_true", help="upload with the kaggle CLI afterwards")
    submit.add_argument("--message", default=None, help="Kaggle submission message")
    submit.set_defaults(func=cmd_submit)

    predict = commands.add_parser("predict", help="predict a folder of images into PNG masks / label images")
    run_options(predict)
    predict.add_argument("--input", action="append", required=True, metavar="PATH",
                         help="a folder of images or an image file (repeatable)")
    predict.add_argument("--output", required=True, metavar="DIR", help="folder for the PNGs (same stems as the inputs)")
    predict.add_argument("--probabilities", action="store_true", help="also write each probability map as a PNG")
    predict.set_defaults(func=cmd_predict)

    tune = commands.add_parser("tune", help="tune post-processing on a run's validation split")
    run_options(tune)
    tune.add_argument("--thresholds", default=None, help="comma-separated foreground thresholds")
    tune.add_argument("--min-sizes", default=None, help="comma-separated minimum object sizes (pixels)")
    tune.add_argument("--methods", default=None, help="comma-separated methods: components,distance,markers")
    tune.add_argument("--empty-thresholds", default=None,
                      help="comma-separated postprocess.empty_threshold values for a model with a classification "
                           "head (default 0.1,...,0.9; the gate is searched only for such a model)")
    tune.add_argument("--limit", type=int, default=None, help="use only the first N validation images")
    tune.add_argument("--cv", default=None, metavar="DIR",
                      help="a CV folder (make cv): tune on every out-of-fold prediction instead of one run")
    tune.set_defaults(func=cmd_tune)

    def file_options(sub):
        _add_pipeline_options(sub)
        sub.add_argument("--format", default=None, help="submission format (default: the config's submission.format)")
        sub.add_argument("--test-dir", default=None, help="test images folder (for image sizes)")

    validate = commands.add_parser("validate", help="check a submission CSV before uploading it")
    validate.add_argument("file", nargs="?", default=None, help="CSV (default: the newest in submissions/)")
    file_options(validate)
    validate.add_argument("--sample", default=None, help="sample submission CSV (default: the config's)")
    validate.set_defaults(func=cmd_validate)

    evaluate = commands.add_parser("evaluate", help="score a submission against a ground-truth CSV")
    evaluate.add_argument("submission", nargs="?", default=None, help="CSV (default: the newest in submissions/)")
    evaluate.add_argument("solution", nargs="?", default=None, help="ground truth (default: dataset.solution)")
    evaluate.add_argument("--solution", dest="solution_option", default=None, metavar="CSV",
                          help="ground truth, as an option (what make evaluate SOLUTION=... passes)")
    file_options(evaluate)
    evaluate.add_argument("--metric", default=None, help="iou_map | f2 | tgs_iou_map | dice (default: the format's)")
    evaluate.add_argument("--per-image", default=None, metavar="CSV", help="write per-image scores here")
    evaluate.add_argument("--verbose", action="store_true", help="print every image's score")
    evaluate.set_defaults(func=cmd_evaluate)

    commands.add_parser("formats", help="list submission formats").set_defaults(func=cmd_formats)
    commands.add_parser("datasets", help="list registered pipelines").set_defaults(func=cmd_datasets)
    models = commands.add_parser("models", help="list registered models and encoders (--params: their sizes)")
    models.add_argument("--params", action="store_true",
                        help="build every model x encoder pair and print its parameter count (slow)")
    models.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="with --params: only these models (repeat or comma-separate)")
    models.add_argument("--encoder", action="append", default=[], metavar="NAME",
                        help="with --params: only these encoders ('none': the plain encoder; "
                             "keras_hub:<folder> works too)")
    models.add_argument("--size", type=int, default=256, help="input height and width for --params (default 256)")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
