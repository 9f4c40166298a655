# The two commands of a fresh clone: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
DEMO_ROUNDS_STEPS ?= 20

.PHONY: install test lint demo demo-rounds clean-demo

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	# img2dataset declares webdataset<0.3 (muco needs 1.x); its other dependencies are in the extras
	$(PY) -m pip install -q -c constraints-cpu.txt --no-deps img2dataset
	touch $(STAMP)

install: $(STAMP)

# two pytest-xdist workers, one test file at a time each (module fixtures are built once), one intra-op thread
# per process so that the workers do not oversubscribe the cores; TEST_WORKERS=0: serial, torch's threads
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: $(STAMP)
	$(if $(XDIST),OMP_NUM_THREADS=1 ,)$(PY) -m pytest -q $(XDIST)

lint: $(STAMP)
	$(VENV)/bin/ruff check muco tests benchmarks

demo: $(STAMP)
	$(PY) -m muco.demo

# the fine-grained benchmark (docs/recipe.md §7): build data/finegrained/, run the five negative arms (in-batch,
# random, static, dynamic, curriculum) once each at smoke scale and print their table; the full comparison is
# `python benchmarks/bench_rounds.py` (3 seeds, the rounds files' steps)
demo-rounds: $(STAMP)
	$(PY) benchmarks/bench_rounds.py --seeds 1 --steps $(DEMO_ROUNDS_STEPS) --root runs/bench_rounds_demo

clean-demo:
	rm -rf data/demo runs/demo
