# `make demo` and `make test` create .venv (pinned, tested versions) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTHON ?= python3
DEEPSPEED_VERSION := 0.19.8
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test venv clean-outputs

$(STAMP): pyproject.toml requirements/dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, from the CPU wheel pin (an unpinned torch would pull a multi-GB CUDA build)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements/dev.txt
	# deepspeed builds against the installed torch; build isolation would fetch another torch
	$(PIP) install --quiet --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(PIP) install --quiet -e .
	touch $@

.venv venv: $(STAMP)

demo: .venv
	$(VENV)/bin/sft-dist train configs/examples/quickstart.yaml
	$(VENV)/bin/sft-dist generate outputs/quickstart --prompt "Qual é a capital de Portugal?" --prompt "Traduza a palavra para o inglês." --input "gato"

test: .venv
	$(VENV)/bin/python -m pytest

clean-outputs:
	rm -rf outputs
