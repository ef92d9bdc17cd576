# `make serve` starts the whole system on the embedded model (flags in ARGS, e.g. make serve ARGS="--port 50052");
# `make test` runs the test suite.
# Both create .venv and install what is needed on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench-engine clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_venv.sh
	PYTHON=$(PYTHON) bash scripts/setup_venv.sh $(VENV)
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/tandem serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean-venv:
	rm -rf $(VENV)
