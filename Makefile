# The two commands of a fresh clone: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint demo clean-demo

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	# img2dataset declares webdataset<0.3 (muco needs 1.x); its other dependencies are in the extras
	$(PY) -m pip install -q -c constraints-cpu.txt --no-deps img2dataset
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check muco tests benchmarks

demo: $(STAMP)
	$(PY) -m muco.demo

clean-demo:
	rm -rf data/demo runs/demo
