# kseg: `make train` then `make submit`; `make test` runs the suite; `make` alone lists the targets.
# The first target that needs Python builds .venv from requirements.txt (re-installed whenever
# requirements.txt changes).

.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DATASET ?= demo
MODEL   ?=
EPOCHS  ?=
FOLD    ?=
DATA    ?=
RUN     ?=
SET     ?=
N_JOBS  ?=
# make submit / tune / validate / evaluate: RUN is a run directory (several, space-separated, are
# averaged); TEST_DIR a test images folder in the dataset's layout; SAMPLE a sample submission CSV
# whose ids define the rows; FILE a submission CSV (default: the newest); SOLUTION a ground truth.
TEST_DIR ?=
SAMPLE   ?=
FILE     ?=
SOLUTION ?=
KAGGLE   ?=
# make submit OUTPUT=path/submission.csv writes exactly that file; make predict INPUT=images OUTPUT=folder.
OUTPUT   ?=
INPUT    ?=
CV       ?=
FOLDS    ?=
JOBS     ?=
DEVICES  ?=

# Optional command-line pieces, present only when the variable is set.
OPTS = --dataset $(DATASET) \
       $(if $(MODEL),--model $(MODEL)) \
       $(if $(DATA),--data "$(DATA)") \
       $(if $(EPOCHS),--set train.epochs=$(EPOCHS)) \
       $(if $(FOLD),--set split.fold=$(FOLD)) \
       $(if $(N_JOBS),--set preprocess.n_jobs=$(N_JOBS)) \
       $(foreach s,$(SET),--set $(s))

# Commands that start from a trained run rather than a pipeline.
RUN_OPTS = --dataset $(DATASET) \
           $(if $(MODEL),--model $(MODEL)) \
           $(foreach r,$(RUN),--run $(r)) \
           $(if $(DATA),--data "$(DATA)") \
           $(foreach s,$(SET),--set $(s))
CV_OPTS = $(if $(CV),--cv "$(CV)")
FILE_OPTS = $(if $(TEST_DIR),--test-dir "$(TEST_DIR)")

.PHONY: help setup demo-data preprocess demo train cv pseudo submit predict tune validate evaluate test test-fast lint-imports bench \
        tensorboard clean clean-cache clean-runs

help:
	@echo "kseg targets (variables in capitals, e.g. make train DATASET=dsb2018 EPOCHS=40):"
	@echo "  train        train DATASET's pipeline (default: the synthetic demo); resumes an unfinished run"
	@echo "  submit       predict the test set with the newest run (RUN=dir...), write and validate the CSV (OUTPUT=file)"
	@echo "  predict      predict INPUT (a folder of images) into PNG masks / label images in OUTPUT (a folder)"
	@echo "  cv           train every fold of DATASET (resuming), keep and score the out-of-fold predictions"
	@echo "  pseudo       pseudo-label TEST_DIR with CV's folds, then a CV round on train + pseudo-labels"
	@echo "               (FOLDS=0,1 JOBS=2 DEVICES=0,1); then make tune CV=dir and make submit CV=dir"
	@echo "  tune         tune post-processing on the run's validation split (CV=dir: on every OOF prediction)"
	@echo "  validate     check a submission CSV (FILE=...)"
	@echo "  evaluate     score a submission CSV against a solution (FILE=..., SOLUTION=...)"
	@echo "  demo         the data path alone: demo data, preprocessing, one epoch of augmented batches"
	@echo "  preprocess   fill the preprocessing cache of DATASET"
	@echo "  demo-data    write the synthetic demo competition to data/demo"
	@echo "  tensorboard  serve runs/ in TensorBoard"
	@echo "  test         import-layer contracts, then the whole test suite (what CI runs)"
	@echo "  test-fast    the same without the end-to-end runs marked slow"
	@echo "  bench        every benchmark in bench/"
	@echo "  clean-cache  delete the preprocessing cache (cache/)"
	@echo "  clean-runs   delete every trained run (runs/): checkpoints, logs, tuned settings"
	@echo "  clean        clean-cache only; trained runs are kept (make clean-runs deletes them)"

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo-data: $(STAMP)
	$(PY) -m kseg demo-data

preprocess: $(STAMP)
	$(PY) -m kseg preprocess $(OPTS)

# The data path alone: demo data, cached parallel preprocessing and one pass of augmented batches.
demo: $(STAMP)
	$(PY) -m kseg demo $(OPTS)

# Trains DATASET's pipeline (default: the synthetic demo, generated on first use); an unfinished
# run with the same config is resumed.
train: $(STAMP)
	$(PY) -m kseg train $(OPTS)

# Trains every fold of DATASET's pipeline into runs/<dataset>-<model>-cv-<fingerprint>/ (a finished
# fold is not retrained; an interrupted one resumes), keeps each fold's out-of-fold probabilities and
# scores them overall and per image group against Otsu.
# Pseudo-labels TEST_DIR's images with CV's folds and trains a new CV round on train + pseudo-labels
# (OOF on real labels only): make pseudo CV=runs/dsb2018-unet-cv-... TEST_DIR=...
pseudo: $(STAMP)
	$(PY) -m kseg pseudo --cv "$(CV)" --test-dir "$(TEST_DIR)" $(foreach s,$(SET),--set $(s)) $(if $(JOBS),--jobs $(JOBS))

cv: $(STAMP)
	$(PY) -m kseg cv $(OPTS) $(if $(FOLDS),--folds $(FOLDS)) $(if $(JOBS),--jobs $(JOBS)) \
	    $(if $(DEVICES),--devices $(DEVICES))

# Predicts the test set with the newest finished run of DATASET (and MODEL, or RUN=dir), writes
# submissions/<dataset>-<run>-<time>.csv and .png (outlines), and fails if the CSV does not validate.
# KAGGLE=1 uploads it with the kaggle CLI.
submit: $(STAMP)
	$(PY) -m kseg submit $(RUN_OPTS) $(CV_OPTS) $(FILE_OPTS) $(if $(SAMPLE),--sample "$(SAMPLE)") $(if $(OUTPUT),--output "$(OUTPUT)") \
	    $(if $(filter 1 yes true,$(KAGGLE)),--kaggle)

# Predicts INPUT (a folder of images, or one image) with the newest finished run (RUN=dir) into OUTPUT
# (a folder): one PNG per image, same stem: a mask, a 16-bit instance label image or a class-index mask.
predict: $(STAMP)
	@test -n "$(INPUT)" -a -n "$(OUTPUT)" || { echo "make predict needs INPUT=images OUTPUT=folder"; exit 2; }
	$(PY) -m kseg predict $(RUN_OPTS) --input "$(INPUT)" --output "$(OUTPUT)"

# Tunes threshold and minimum object size on the run's validation split -> runs/<run>/postprocess.json,
# which make submit then uses in preference to the config's postprocess section.
tune: $(STAMP)
	$(PY) -m kseg tune $(RUN_OPTS) $(CV_OPTS)

validate: $(STAMP)
	$(PY) -m kseg validate $(if $(FILE),"$(FILE)") $(OPTS) $(FILE_OPTS) $(if $(SAMPLE),--sample "$(SAMPLE)")

# Scores FILE against SOLUTION (default: the dataset's solution CSV, e.g. the demo's stage1_solution.csv).
evaluate: $(STAMP)
	$(PY) -m kseg evaluate $(if $(FILE),"$(FILE)") $(if $(SOLUTION),--solution "$(SOLUTION)") $(OPTS) $(FILE_OPTS)

# The import-layer contracts (pyproject.toml) first, then the suite.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q --durations=15 tests

test-fast: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -m "not slow" tests

lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

bench: $(STAMP)
	@for script in bench/[!_]*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

tensorboard: $(STAMP)
	$(PY) -m tensorboard.main --logdir runs

clean: clean-cache
	@echo "trained runs in runs/ are kept: make clean-runs deletes them"

clean-cache:
	rm -rf cache

clean-runs:
	rm -rf runs
