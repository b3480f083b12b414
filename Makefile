# hfbatch: the two commands of the README (make demo, make test) work on a fresh machine.
# Each target creates .venv when missing and installs torch==2.13.0 (the local CPU wheel)
# before the project, so pip never resolves torch to a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hfbatch-installed
TORCH  := torch==2.13.0

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(VENV)/bin/hfbatch embed sample_data/reviews.csv -o out/reviews.embedded.parquet
	@echo "wrote out/reviews.embedded.parquet and out/reviews.embedded.parquet.meta.json"

TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

bench: install
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_scale.py
	$(PY) benchmarks/bench_retrieval.py
	$(PY) benchmarks/bench_stores.py
	$(PY) benchmarks/bench_sync.py
	$(PY) benchmarks/bench_runtimes.py
	$(PY) benchmarks/bench_default.py  # makes benchmarks/.work/st-openvino (ST + optimum-intel) once
	$(PY) benchmarks/bench_kinds.py  # sparse, multi-vector, score against their sentence-transformers classes

clean:
	rm -rf out benchmarks/.work .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
