# Set-up happens here: `make train` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install train test test-fast tensorboard clean

install: $(STAMP)

# Re-installs only when the dependency list or pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing busiseg and its dependencies into $(VENV) (log: $(VENV)/pip.log) ..."
	$(PY) -m pip install -c constraints.txt -e '.[dev]' > $(VENV)/pip.log 2>&1 || (grep -v '^WARNING: Location' $(VENV)/pip.log | tail -30; \
	  if grep -q 'No space left on device' $(VENV)/pip.log; then \
	    echo "error: the disk holding $(VENV) is full: the install needs about 7 GB free (torch 2.14.1 with its CUDA libraries is about 5.6 GB); free space and rerun make"; \
	    df -h $(VENV) | tail -1; fi; \
	  exit 1)
	$(PY) -c "import busiseg, torch, lightning, segmentation_models_pytorch, albumentations; print('busiseg installed, torch', torch.__version__)"
	touch $(STAMP)

# The main job on the embedded default (the synthetic phantom). Extra overrides: make train ARGS="trainer.max_epochs=5"
train: install
	$(PY) -m busiseg.train $(ARGS)

# Fast tests plus slow ones; BUSI_ROOT enables the real-data tests.
test: install
	$(PY) -m pytest -q $(ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

tensorboard: install
	$(VENV)/bin/tensorboard --logdir logs --bind_all

clean:
	rm -rf logs .pytest_cache
