# The newcomer's entry points:  `make digits` (set up, then run the embedded default) and
# `make test` (set up, then run the tests).  Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN := $(PY) -m tract_repro.launch

.PHONY: setup test digits digits-students digits-tract digits-btd bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

# Teacher first, then TRACT 1024→32→1 and BTD 1024→…→1 as two parallel one-thread processes.
digits: setup
	$(RUN) gin/digits_teacher.gin
	$(MAKE) -j2 digits-students
	@echo "one-step sample grids: runs/digits_tract_1024_32_1/samples/final_1steps.png runs/digits_btd/samples/final_1steps.png"

digits-students: digits-tract digits-btd

digits-tract:
	$(RUN) gin/digits_tract_1024_32_1.gin

digits-btd:
	$(RUN) gin/digits_btd.gin

bench: setup
	$(PY) benchmarks/throughput.py
