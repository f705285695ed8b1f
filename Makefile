# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup browser demo lint test clean

$(BIN)/sae-vlm: pyproject.toml scripts/setup.sh
	PY=$(PY) bash scripts/setup.sh $(VENV)
	@touch $@

setup: $(BIN)/sae-vlm

# The browser tests drive Debian's Chromium; install it where we can (root on Debian), else they skip.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "note: chromium/chromedriver not installed; the browser tests will be skipped"

demo: setup
	$(BIN)/sae-vlm demo --out runs/demo

# The conventions CONVENTIONS.md writes down: pyflakes, import order and line length (ruff); types (pyright, basic).
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pyright --pythonpath $(BIN)/python

test: setup browser lint
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
