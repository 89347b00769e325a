# Every target sets itself up: a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this project's CPU machines; the GPU machine brings its own.
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= The mixture of experts

GATE_RESULT ?= artifacts/gates/cpu-result.json
# The GPU machine's torch, for `make test-device-torch` (its AOTInductor bugs show on a CPU too)
DEVICE_TORCH_SPEC ?= torch==2.11.0
DEVICE_VENV ?= .venv-device

.PHONY: setup demo test test-device-torch gate gate-update clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[compiler,test]"
	touch $@

demo: setup
	$(VENV)/bin/moe-compile recipes/tiny-mixtral.yaml
	$(VENV)/bin/moe-runtime generate artifacts/tiny-mixtral --prompt "$(PROMPT)" --max-tokens 32

test: setup
	$(PY) -m pytest -q tests --durations=15
	$(MAKE) --no-print-directory gate

# The test suite under the GPU machine's torch, on this CPU: a version's compiler bug found here
# costs no device time. Not CI (PyPI has only the CUDA build of that torch: a few GB). The
# TRITON_INTERPRET tests are left out: that torch's wrap_triton rejects interpreted kernels.
test-device-torch:
	test -x $(DEVICE_VENV)/bin/python || $(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install -q "$(DEVICE_TORCH_SPEC)"
	$(DEVICE_VENV)/bin/python -m pip install -q -e ".[compiler,test]"
	$(DEVICE_VENV)/bin/python -m pytest -q -p no:cacheprovider tests -k "not under_interpreter"

# CPU performance gates: fails when a number leaves its tolerance in benchmarks/baselines/cpu.json
gate: setup
	$(PY) benchmarks/cpu_gates.py --out $(GATE_RESULT)
	$(PY) benchmarks/gate.py $(GATE_RESULT) benchmarks/baselines/cpu.json

# a change moved a gated number on purpose: accept the new values (and say why in the commit)
gate-update: setup
	$(PY) benchmarks/cpu_gates.py --out $(GATE_RESULT)
	$(PY) benchmarks/gate.py $(GATE_RESULT) benchmarks/baselines/cpu.json --update

clean:
	rm -rf artifacts/ .pytest_cache
