# The two commands of the README. Each creates .venv and installs the pinned CPU set
# (constraints/cpu.txt) the first time, and again whenever the pins change.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first, by exact version: that takes the CPU build; a range would pull a
	@# multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints/cpu.txt -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(BIN)/python jobs/train_geo3k.py --preset cpu-tiny

test: $(STAMP)
	$(BIN)/python -m pytest
