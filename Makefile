# `make demo` and `make test` create .venv (pinned, tested versions) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTHON ?= python3
DEEPSPEED_VERSION := 0.19.8
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed-stamp
OPS_STAMP := $(VENV)/.deepspeed-ops-stamp
# DeepSpeed compiles its CPU ops (Adam for ZeRO offload, the shared-memory allreduce) on first use, into
# TORCH_EXTENSIONS_DIR. They are built once here, with the venv, instead of inside the first run that needs them
# (~100 s on 2 cores), and kept in the venv: a build embeds the venv's paths, so two checkouts sharing
# ~/.cache/torch_extensions would rebuild each other's at every run.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: demo test test-fast test-latest venv clean-outputs

$(STAMP): pyproject.toml requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, from the CPU wheel pin (an unpinned torch would pull a multi-GB CUDA build)
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -r requirements/dev.txt
	# deepspeed builds against the installed torch; build isolation would fetch another torch
	$(PIP) install --quiet --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(PIP) install --quiet -e .
	touch $@

$(OPS_STAMP): $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder; \
		[b().load(verbose=False) for b in (CPUAdamBuilder, ShareMemCommBuilder)]"
	touch $@

.venv venv: $(STAMP) $(OPS_STAMP)

demo: .venv
	$(VENV)/bin/sft-dist train configs/examples/quickstart.yaml
	$(VENV)/bin/sft-dist generate outputs/quickstart --prompt "Qual é a capital de Portugal?" --prompt "Traduza a palavra para o inglês." --input "gato"

test: .venv
	$(VENV)/bin/python -m pytest

# The unit tests, without the end-to-end runs that start processes (marked slow): the edit loop, 2-4 minutes on 2 cores.
test-fast: .venv
	$(VENV)/bin/python -m pytest -m "not slow" -q

# Not run by CI. The fast tests against the newest released transformers, trl, peft and accelerate (torch stays at
# the CPU wheel pin, everything else at requirements/dev.txt), in a venv of its own: what an upgrade would break,
# before the pins in requirements/dev.txt and the ranges in pyproject.toml move.
LATEST_VENV ?= .venv-latest
LATEST_PIP := $(LATEST_VENV)/bin/python -m pip
LATEST_LIBS := transformers trl peft accelerate

test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PIP) install --quiet --upgrade pip
	echo "torch==$(TORCH_VERSION)" > $(LATEST_VENV)/constraints.txt
	grep -vE '^(transformers|trl|peft|accelerate)[=<>~ ]' requirements/dev.txt > $(LATEST_VENV)/requirements.txt
	$(LATEST_PIP) install --quiet torch==$(TORCH_VERSION)
	$(LATEST_PIP) install --quiet --upgrade -c $(LATEST_VENV)/constraints.txt -r $(LATEST_VENV)/requirements.txt $(LATEST_LIBS)
	$(LATEST_PIP) install --quiet --no-build-isolation -c $(LATEST_VENV)/constraints.txt deepspeed==$(DEEPSPEED_VERSION)
	$(LATEST_PIP) install --quiet --no-deps -e .
	@echo "== tested (requirements/dev.txt):"; grep -E '^(transformers|trl|peft|accelerate)==' requirements/dev.txt
	@echo "== newest (this run):"; $(LATEST_PIP) list --format=freeze | grep -iE '^(torch|transformers|trl|peft|accelerate)=='
	@{ $(LATEST_VENV)/bin/python -m pytest -m "not slow" -q -p no:cacheprovider; echo $$? > $(LATEST_VENV)/pytest.rc; } \
		2>&1 | tee $(LATEST_VENV)/pytest.log; \
	rc=$$(cat $(LATEST_VENV)/pytest.rc); \
	echo "== what broke against the newest releases (full log: $(LATEST_VENV)/pytest.log):"; \
	grep -E '^(FAILED|ERROR) ' $(LATEST_VENV)/pytest.log || { [ "$$rc" = 0 ] && echo "nothing: the fast tests pass"; } \
		|| echo "pytest exited $$rc (see the log)"; \
	exit $$rc

clean-outputs:
	rm -rf outputs
