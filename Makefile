# idql-cm: the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TASK   ?= halfcheetah-medium-v2
SEED   ?= 0
SEEDS  ?= 1

.PHONY: install demo test test-fast lint bench quality quality-full quality-ablate quality-guidance pipeline report clean help

help:
	@echo "make demo      - collect the built-in HalfCheetah dataset, train IQL, EDM, CD, CT and MeanFlow on CPU, evaluate, report"
	@echo "make test      - run the test suite"
	@echo "make bench     - throughput benchmarks -> benchmarks/results.json"
	@echo "make quality   - generative-policy quality on six known toys + a medium-expert analogue, one seed (CPU, ~35-40 min on 2 idle cores)"
	@echo "make quality-full - the verdict over seeds: toys at 3 data seeds, two analogues x 5 members, CT from EDM (CPU, ~4 h)"
	@echo "make quality-guidance - critic-guided one-step policies (q_weight) on the paid toy and the medium-expert analogue (CPU, ~70 min)"
	@echo "make pipeline TASK=halfcheetah-medium-v2 SEED=0 - full protocol on a D4RL file (GPU)"
	@echo "make pipeline TASK=halfcheetah-medium-v2 SEEDS=5 - the same, every stage a 5-member ensemble (seeds SEED..SEED+4)"

$(STAMP): setup.cfg pyproject.toml scripts/install.sh
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh

install: $(STAMP)

demo: $(STAMP)
	@$(BIN)/python scripts/run_pipeline.py --preset demo --out results/demo

test: $(STAMP)
	@$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	@$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	@$(BIN)/ruff check idql_cm tests scripts benchmarks

bench: $(STAMP)
	@$(BIN)/python -m benchmarks --out benchmarks/results.json

quality: $(STAMP)
	@$(BIN)/python -m benchmarks.quality --out results/quality

quality-full: $(STAMP)
	@$(BIN)/python -m benchmarks.quality --preset full --out results/quality

quality-guidance: $(STAMP)
	@$(BIN)/python -m benchmarks.quality_guidance --out results/quality

quality-ablate: $(STAMP)
	@$(BIN)/python -m benchmarks.quality --out results/quality --part toys --ablate

pipeline: $(STAMP)
	@$(BIN)/python scripts/run_pipeline.py --task $(TASK) --seed $(SEED) --seeds $(SEEDS)

report: $(STAMP)
	@$(BIN)/idql-cm report results/$(TASK)/seed*/

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
