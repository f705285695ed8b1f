# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/sae-vlm: pyproject.toml scripts/setup.sh
	PY=$(PY) bash scripts/setup.sh $(VENV)
	@touch $@

setup: $(BIN)/sae-vlm

demo: setup
	$(BIN)/sae-vlm demo --out runs/demo

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
