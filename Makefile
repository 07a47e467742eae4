# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Notebook checks (nbval) run a smaller synthetic configuration so they stay within minutes;
# it still learns (tests/check_nbval_run.py bounds what it reaches).
NBVAL_OVERRIDES ?= synthetic_train=400 synthetic_test=50 synthetic_val=50 epochs=6 \
  run=nbval progress=false anno_path=outputs/data/synthetic-nbval video_path=outputs/data/synthetic-nbval/videos

.PHONY: setup demo test lint test-unit test-notebooks notebooks ablations clean

setup: $(STAMP)

# JupyterLab in this venv saves widget state with the notebook, so that a saved explorer
# (notebook 05) reopens as its last view instead of "Error displaying widget: model not found".
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,tensorboard]"
	mkdir -p $(LAB_SETTINGS)
	echo '{"@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": true}}' > $(LAB_SETTINGS)/overrides.json
	touch $(STAMP)

demo: setup
	$(PY) -m emcl_nb.demo

test: setup lint test-unit test-notebooks

# ruff's rules are in pyproject.toml ([tool.ruff]).
lint: setup
	$(PY) -m ruff check .

test-unit: setup
	$(PY) -m pytest tests

# nbval re-runs every cell (any error fails) but compares stored outputs only in cells
# tagged nbval-check-output, with digits and run names masked (tests/nbval_sanitize.cfg):
# the stored outputs come from the demo configuration, and floats differ between CPUs.
# Then check_nbval_run.py bounds what the nbval run learned.
test-notebooks: setup
	rm -rf outputs/synthetic/nbval outputs/synthetic/nbval-* outputs/data/synthetic-nbval
	EMCL_NB_OVERRIDES="$(NBVAL_OVERRIDES)" \
	  $(PY) -m pytest --nbval-lax notebooks tests/check_nbval_run.py --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

# Refresh what the repository shows from one demo run: the stored notebook outputs, the
# seed study and the README's results section (about 20 minutes on 2 cores).
notebooks: setup
	$(PY) -m emcl_nb.demo --refresh

# The seeded ablation grid (params/synthetic-ablations.yaml, 3 training seeds): trains what is
# missing, re-reads what is done (seconds on a finished grid), writes docs/results/ablations.json
# (what notebook 04 shows) and the README's ablation section.
ablations: setup
	$(PY) -m emcl_nb.ablations

clean:
	rm -rf $(VENV) outputs/*/ .pytest_cache
