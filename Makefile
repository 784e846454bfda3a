# kd_trainer: every target creates the environment first if it is missing.
#   make test                          the test suite (what CI runs)
#   make demo [SEEDS=3]                SynthPEDES: teacher, student without/with KD (at SEEDS seeds), table
#   make train RECIPE=recipes/x.yaml [ARGS="key.sub=value ..."]
#   make eval MODEL=runs/x DATASET=rstpreid ROOT=./data [SPLIT=test]
#   make report [RUNS="runs/*"] [OUT=reports] [REPORT_ARGS="--minp"]   results.md + loss plots
#   make compare [COMPARE_SEEDS="42 1 2"]  every method on SynthPEDES (recipes/synth/) per seed, then the report
#   make bench [BENCH_ARGS=--quick]    step/eval/loader timings and the KD-cost ratios (CPU or GPU)
#   make deploy-bench [DEPLOY_BENCH_ARGS=--quick]   PyTorch/ONNX/INT8 latency, size, memory: teacher vs student
#   make bench-accum [ACCUM_BENCH_ARGS=...]          memory and time of 1x64 vs exact 4x16 / 8x8 accumulation
#   make docs                          the docs site into site/ (mkdocs build --strict: a broken link fails)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch build the project is tested with (pip takes it from local files where they exist).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.kd_trainer-installed
PYTEST_ARGS ?=

.PHONY: install test test-fast demo train eval compare bench deploy-bench report clean-runs help
help:
	@sed -n '1,11p' Makefile

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

SEEDS ?= 1
demo: $(STAMP)
	$(PY) -m kd_trainer demo --seeds $(SEEDS)

RECIPE ?=
ARGS ?=
train: $(STAMP)
	@test -n "$(RECIPE)" || (echo "usage: make train RECIPE=recipes/<name>.yaml [ARGS='key=value ...']"; exit 2)
	$(VENV)/bin/accelerate launch --quiet kd_trainer/run.py $(RECIPE) $(ARGS)

MODEL ?=
DATASET ?=
ROOT ?= ./data
SPLIT ?= test
eval: $(STAMP)
	@test -n "$(MODEL)" -a -n "$(DATASET)" || (echo "usage: make eval MODEL=runs/<run> DATASET=<name> [ROOT=./data SPLIT=test]"; exit 2)
	$(PY) -m kd_trainer eval $(MODEL) --dataset $(DATASET) --root $(ROOT) --split $(SPLIT)

RUNS ?= runs
OUT ?= reports
REPORT_ARGS ?=
report: $(STAMP)
	$(PY) -m kd_trainer report $(RUNS) --out $(OUT) $(REPORT_ARGS)

# The demo's teacher (pre-trained on the corpus, then fine-tuned; made once and read back after),
# then every method's SynthPEDES twin at each seed of COMPARE_SEEDS (ours_from_motis continues from
# that seed's motis_2stage, so order matters), then one table in which runs that differ only in
# their seed share a cell: mean ± std (n), with the pairs that separate. A finished run is kept when
# it was made against this very teacher (teacher.sha256 beside its results); delete its folder to
# train it again.
SYNTH_METHODS := finetune_itc cross_kd clip_kd motis_2stage conaclip_2stage ours_3stage ours_from_motis
COMPARE_SEEDS ?= 42 1 2
compare: $(STAMP)
	$(PY) -m kd_trainer demo --teacher-only
	@td=$$(sha256sum runs/demo/teacher/model.safetensors | cut -d' ' -f1); \
	for s in $(COMPARE_SEEDS); do for m in $(SYNTH_METHODS); do \
	  out=runs/synth/seed$$s/$$m; \
	  if [ -f $$out/test_results.json ] && [ "$$(cat $$out/teacher.sha256 2>/dev/null)" = "$$td" ]; then \
	    echo "== $$m, seed $$s: kept ($$out)"; continue; fi; \
	  if [ -f $$out/test_results.json ]; then echo "== $$m, seed $$s: made against another teacher, trained again"; \
	  else echo "== $$m, seed $$s"; fi; rm -rf $$out; \
	  extra=""; if [ $$m = ours_from_motis ]; then extra="student.checkpoint=runs/synth/seed$$s/motis_2stage"; fi; \
	  $(PY) -m kd_trainer recipes/synth/$$m.yaml seed=$$s training.output_dir=$$out $$extra || exit 1; \
	  echo $$td > $$out/teacher.sha256; \
	done; done
	$(PY) -m kd_trainer report runs/demo/teacher runs/synth --out runs/synth/report --minp

BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) bench/bench_kd.py $(BENCH_ARGS)

DEPLOY_BENCH_ARGS ?=
deploy-bench: $(STAMP)
	$(PY) bench/bench_deploy.py $(DEPLOY_BENCH_ARGS)

# Exact gradient accumulation's price (issue 17): peak memory and step time of a global batch of 64
# as 1x64, 4x16 exact, 8x8 exact and plain 8x8, each in its own process (CPU: peak RSS; CUDA:
# max_memory_allocated).
ACCUM_BENCH_ARGS ?=
.PHONY: bench-accum
bench-accum: $(STAMP)
	$(PY) bench/bench_accumulation.py $(ACCUM_BENCH_ARGS)

# The docs site (docs/, mkdocs.yml); the reference pages are generated from the code at build time.
.PHONY: docs
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean-runs:
	rm -rf runs/demo
