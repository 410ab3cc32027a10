# Newcomer commands: `make demo` and `make test`. Everything else is a building block.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.chattune-installed
DEMO_DATA := data/demo/chattune_demo.jsonl

.PHONY: install assets test test-fast demo lint bench-preprocess bench-train clean-cache llama-cpp export-demo

# torch is pinned first so pip takes the local CPU wheel instead of a multi-GB CUDA build;
# DeepSpeed builds no ops at install time (they JIT-compile on first use); FastChat is installed
# without its dependencies, only as the reference our template tests compare against.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps fschat==0.2.36
	touch $(STAMP)

install: $(STAMP)

assets: install
	$(PY) -m data.assets

# Two pytest workers: most tests wait on one single-threaded process (imports, a tiny model), so two of them
# share the 2 cores of a CI machine far better than one (`PYTEST_WORKERS=0` runs them in one process).
PYTEST_WORKERS ?= 2
PYTEST_ARGS = -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist worksteal)

test: assets
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: assets
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow"

demo: assets
	$(PY) -m data.validate $(DEMO_DATA)
	$(PY) -m data.inspect --data $(DEMO_DATA) --tokenizer asset:smollm2 --template chatml --index 0 --count 1
	$(PY) scripts/demo.py --output_dir outputs/demo

# llama.cpp's half of the export parity gate (docs/export.md): building llama-cpp-python takes ~5 minutes on 2
# cores the first time (the wheel is cached), so it runs here rather than in `make test`.
llama-cpp: install
	$(PY) scripts/install_llama_cpp.py

export-demo: assets llama-cpp
	$(PY) scripts/export_demo.py --output_dir outputs/demo

lint: install
	$(VENV)/bin/ruff check .

bench-preprocess: assets
	$(PY) scripts/bench_preprocess.py

bench-train: assets
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) scripts/bench_train.py

clean-cache:
	rm -rf $${CHATTUNE_CACHE:-$$HOME/.cache/chattune}/datasets
