# kseg: `make train` then `make submit`; `make test` runs the suite. The first target that needs
# Python builds .venv from requirements.txt (re-installed whenever requirements.txt changes).

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

# Optional command-line pieces, present only when the variable is set.
OPTS = --dataset $(DATASET) \
       $(if $(MODEL),--model $(MODEL)) \
       $(if $(DATA),--data $(DATA)) \
       $(if $(EPOCHS),--set train.epochs=$(EPOCHS)) \
       $(if $(FOLD),--set split.fold=$(FOLD)) \
       $(if $(N_JOBS),--set preprocess.n_jobs=$(N_JOBS)) \
       $(foreach s,$(SET),--set $(s))

.PHONY: setup demo-data preprocess demo train test test-fast bench tensorboard clean

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

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	@for script in bench/[!_]*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

tensorboard: $(STAMP)
	$(PY) -m tensorboard.main --logdir runs

clean:
	rm -rf cache runs
