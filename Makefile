# Two commands for a newcomer: `make demo` (sets up .venv, then runs the demo) and `make test`.
# On a GPU machine pick the torch build: make demo TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
# the CPU build of torch that lies on this project's machines (a bare `torch` pulls a CUDA build)
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo lint docs test test-slow

setup: $(BIN)/fcl-lightning

$(BIN)/fcl-lightning: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/fcl-lightning fit --config configs/demo.yaml

# lint and format check (ruff, configured in pyproject.toml)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the docs site (mkdocs.yml, docs/): --strict fails on a broken link, a missing page or a docstring
# the API reference cannot read; `$(BIN)/mkdocs serve` shows it at http://127.0.0.1:8000
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# the test command (.ci/run runs it too): lint, the docs site, then the suite; wandb never touches the network.
# Two pytest-xdist workers of one torch thread each: the tests are tiny models, mostly one busy thread,
# so two workers fill two cores (measured: 133-219 s against 307 s in one process, 2-core AMD EPYC)
test: lint docs
	WANDB_MODE=disabled OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal

# the tests left out of `make test`: real processes (SIGKILL at random points, then resume) and
# the longer end-to-end runs (tables runner, Flower resume and fine-tuning, shipped sweeps, ablations)
test-slow: setup
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m slow
