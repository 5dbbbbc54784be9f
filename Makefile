# `make demo` and `make test` each create and fill .venv by themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[train,test]'
	touch $(STAMP)

install: $(STAMP)

# The first run: the whole pipeline on the bundled digits with smaller images and fewer epochs
# (dlheir demo --quick, a few minutes); then the full one (64 px, 6 epochs) with make demo-full.
demo: $(STAMP)
	$(VENV)/bin/dlheir demo --quick

# the quick demo with the cloud server on PostgreSQL and Ceph RGW (both started for the run, then stopped)
.PHONY: demo-engines
demo-engines: $(STAMP) engines
	$(PY) tests/engines.py run -- $(VENV)/bin/dlheir demo --quick --work-dir runs/demo-engines \
		--store {store} --blobs {blobs}

.PHONY: demo-full
demo-full: $(STAMP)
	$(VENV)/bin/dlheir demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint engines
	$(PY) -m pytest -q tests

# The cloud-server tests again with every test server on PostgreSQL + Ceph RGW (--store/--blobs)
# instead of the embedded store; the tests of the SQLite file itself are skipped.
ENGINE_TESTS ?= tests/test_cloud_server.py tests/test_access.py tests/test_private_mode.py tests/test_lifecycle.py \
	tests/test_lying_server.py tests/test_search_reply.py tests/test_server_hardening.py tests/test_snapshot.py \
	tests/test_client_api.py tests/test_rotation_resume.py tests/test_e2e.py tests/test_reindex.py
# `dlheir bench search` and `bench e2e` on both backends in one run: the embedded store, then PostgreSQL +
# Ceph RGW (started by tests/engines.py for the run). Results: results/bench_{search,e2e}/{embedded,engines}/.
BENCH_SIZES ?= 10000,100000
FRONTS_ITEMS ?= 1000000
.PHONY: bench-fronts
bench-fronts: $(STAMP) engines
	$(PY) tests/engines.py run -- $(VENV)/bin/dlheir bench fronts --store {store} --items $(FRONTS_ITEMS)

.PHONY: bench-backends
bench-backends: $(STAMP) engines
	$(VENV)/bin/dlheir bench search --codes random --sizes $(BENCH_SIZES) --out-dir results/bench_search/embedded
	$(PY) tests/engines.py run -- $(VENV)/bin/dlheir bench search --codes random --sizes $(BENCH_SIZES) \
		--store {store} --blobs {blobs} --out-dir results/bench_search/engines
	$(VENV)/bin/dlheir bench e2e --sizes 2000,10000 --out-dir results/bench_e2e/embedded
	$(PY) tests/engines.py run -- $(VENV)/bin/dlheir bench e2e --sizes 2000,10000 \
		--store {store} --blobs {blobs} --out-dir results/bench_e2e/engines

.PHONY: test-engines
test-engines: $(STAMP) engines
	DLHEIR_TEST_ENGINES=1 $(PY) -m pytest -q $(ENGINE_TESTS)

clean:
	rm -rf $(VENV) runs results

# NVIDIA's perf_analyzer (from the tritonclient 2.34.0 wheel, with libcudart and libb64 beside
# it) for `dlheir bench hash`; not needed by `make test`, whose perf_analyzer test skips without it.
PERF_ANALYZER := $(VENV)/perf_analyzer/perf_analyzer

.PHONY: perf-analyzer
perf-analyzer: $(PERF_ANALYZER)

$(PERF_ANALYZER): | $(STAMP)
	$(PY) -m dlheir.benchmarks.perf_analyzer install $(VENV)/perf_analyzer

# The real storage engines that tests/engines.py starts on loopback for the store backend's tests:
# PostgreSQL and Ceph (monitor, OSD, the S3 gateway radosgw), from Debian's archive. As root, only the
# missing packages are installed (nothing when all are there); otherwise one line says what to install.
ENGINE_CHECKS := postgresql:'ls /usr/lib/postgresql/*/bin/postgres' radosgw:'command -v radosgw' \
	ceph-mon:'command -v ceph-mon && command -v monmaptool' ceph-osd:'command -v ceph-osd' \
	ceph-common:'command -v ceph && command -v radosgw-admin && command -v ceph-authtool'

.PHONY: engines
engines:
	@missing=""; \
	for check in $(ENGINE_CHECKS); do \
		sh -c "$${check#*:}" >/dev/null 2>&1 || missing="$$missing $${check%%:*}"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "make engines: missing$$missing: run sudo apt-get install -y --no-install-recommends$$missing"; \
		exit 0; \
	fi; \
	echo "make engines: installing$$missing"; \
	apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing

# Size and time of the base install (serve and query, no torch) and the full one ('.[train]'), each
# into a fresh virtualenv: prints a table, writes results/install_sizes.json.
.PHONY: install-sizes
install-sizes:
	python3 benchmarks/install_sizes.py
