# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Notebook checks (nbval) run a smaller synthetic configuration so they stay within minutes.
NBVAL_OVERRIDES ?= synthetic_train=160 synthetic_test=40 synthetic_val=20 epochs=3 ablation_epochs=1 run=nbval \
  progress=false anno_path=outputs/data/synthetic-nbval video_path=outputs/data/synthetic-nbval/videos

.PHONY: setup demo test test-unit test-notebooks notebooks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

demo: setup
	$(PY) -m emcl_nb.demo

test: setup test-unit test-notebooks

test-unit: setup
	$(PY) -m pytest tests

# nbval re-runs the notebooks from scratch: a run left by an earlier check would be reused.
test-notebooks: setup
	rm -rf outputs/synthetic/nbval outputs/synthetic/nbval-* outputs/data/synthetic-nbval
	EMCL_NB_OVERRIDES="$(NBVAL_OVERRIDES)" \
	  $(PY) -m pytest --nbval notebooks --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

# Re-execute the notebooks in place with the nbval configuration (refreshes their stored outputs).
notebooks: setup
	rm -rf outputs/synthetic/nbval outputs/synthetic/nbval-* outputs/data/synthetic-nbval
	cd notebooks && EMCL_NB_OVERRIDES="$(NBVAL_OVERRIDES)" ../$(PY) -m jupyter nbconvert \
	  --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 0*.ipynb

clean:
	rm -rf $(VENV) outputs/*/ .pytest_cache
