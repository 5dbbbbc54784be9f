# `make demo` and `make test` each create and fill .venv by themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dlheir demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs results

# NVIDIA's perf_analyzer (from the tritonclient 2.34.0 wheel, with libcudart and libb64 beside
# it) for `dlheir bench hash`; not needed by `make test`, whose perf_analyzer test skips without it.
PERF_ANALYZER := $(VENV)/perf_analyzer/perf_analyzer

.PHONY: perf-analyzer
perf-analyzer: $(PERF_ANALYZER)

$(PERF_ANALYZER): | $(STAMP)
	$(PY) -m dlheir.benchmarks.perf_analyzer install $(VENV)/perf_analyzer
