# The newcomer's entry points:  `make digits` (set up, then run the embedded default) and
# `make test` (set up, then run the tests).  Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN := $(PY) -m tract_repro.launch

.PHONY: setup lock test digits digits-latent digits-table1 digits-guided digits-guided-ablations digits-sweep bench

# Installs the pinned environment (requirements.lock), then the project itself without resolving again.
$(VENV)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -r requirements.lock
	$(VENV)/bin/pip install --no-deps -e '.[test,tensorboard,export,latent]'
	touch $@

# Re-pin requirements.lock from an unpinned resolution of pyproject.toml (then run `make test`).
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv && .lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q -e '.[test,tensorboard,export,latent]'
	{ sed -n '1,4p' requirements.lock; .lock-venv/bin/pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock && rm -rf .lock-venv

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

DVC := $(VENV)/bin/dvc
# The digits tables, each a DVC stage (classifier → teacher → shared phases → evaluations → table):
# the DDIM-teacher tables, then Table 1's EDM rows (a second teacher, trained last).
DIGITS_TABLES := digits_table1 digits_table3 digits_table4 digits_table5 digits_table6 digits_btd_vs_tract
DIGITS_EDM := digits_table1_edm
DIGITS_GUIDED := digits_guided

# Stage commands start warm: python -m tract_repro.warm forks them from a server that has imported
# torch once (each would otherwise spend ~4-6 s on imports; a stage still runs the same, cold, without it).
REPRO := PATH="$(abspath $(VENV))/bin:$$PATH" $(abspath $(PY)) -m tract_repro.warm $(abspath $(DVC)) repro

# The embedded default: every digits table (Table 1 first, so that it is ready early), then where to look.
digits: setup
	$(REPRO) digits_table1
	$(REPRO) $(DIGITS_TABLES)
	$(REPRO) $(DIGITS_EDM)
	$(REPRO) $(DIGITS_GUIDED)
	@echo "tables: results/table1.md results/table3.md results/table4.md results/table5.md results/table6.md results/btd_vs_tract.md results/table1_edm.md results/guided.md"
	@echo "plots and sample grids: results/digits/*.png (guided: results/digits/guided.png, guided_grids.png), results/digits/eval/*/s0_1steps.png"

# The latent embedded default (docs/latent-digits.md): Table 1 on latent digits (classifier → the digits VAE →
# its latents → the class-conditional latent teacher → BTD and TRACT students → results/table1_latent.md), then
# guided distillation in latent space (a guided latent teacher → stage 1 → BTD, TRACT and stochastic students →
# results/guided_latent.md).
digits-latent: setup
	$(REPRO) digits_table1_latent
	$(REPRO) digits_guided_latent
	@echo "tables: results/table1_latent.md results/guided_latent.md"
	@echo "plots: results/digits/table1_latent.png, results/digits/guided_latent.png, guided_latent_pr.png, guided_latent_grids.png"

# Guided distillation alone (Meng et al.: guided teacher, stage 1, BTD/TRACT/stochastic students at w = 0…4).
digits-guided: setup
	$(REPRO) $(DIGITS_GUIDED)
	@echo "table: results/guided.md; plots: results/digits/guided.png, results/digits/guided_grids.png"

# The guided stage-2 ablations (clipping inside targets; students started from their teacher), outside the default run.
digits-guided-ablations: setup
	$(REPRO) digits_guided_ablations
	@echo "table: results/guided_ablations.md; plots: results/digits/guided_ablations.png"

# Digits Table 1 alone (BTD vs TRACT with teacher baselines).
digits-table1: setup
	$(REPRO) digits_table1
	@echo "table: results/table1.md; plot: results/digits/table1.png"

# The budget sweep (outside the default run).
digits-sweep: setup
	$(REPRO) digits_budget_sweep

bench: setup
	$(PY) benchmarks/throughput.py
