# Two commands for a newcomer: `make run` (the whole fleet) and `make test` (the whole suite).
# Each sets up what it needs: a virtualenv with the project's packages, and Nginx.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast lint bench convert weights nginx redis chromium clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Nginx from Debian's packages when missing and we are root; otherwise say what to do.
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; \
	  else \
	    echo "Nginx is missing: run 'sudo apt-get install nginx-light' (or your system's nginx package)" >&2; exit 1; \
	  fi; }

# redis-server for the shared rate-limit test, the same way.
redis:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "redis-server is missing: run 'sudo apt-get install redis-server'" >&2; exit 1; \
	  fi; }

# Headless Chromium and its driver for the web-page test, the same way.
chromium:
	@command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "chromium is missing: run 'sudo apt-get install chromium chromium-driver'" >&2; exit 1; \
	  fi; }

## The whole fleet in the foreground: Nginx :8080 -> gateway :8000 -> vgg16/resnet50/inceptionv3.
run: $(STAMP) nginx
	$(PY) -m deploy.local.fleet

## The whole suite, end-to-end tests included (~10 minutes on 2 cores).
test: $(STAMP) nginx redis chromium
	$(PY) -m pytest

## Unit tests only (no fleet, no full-size models).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not e2e and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy common gateway deploy client

## Speed and memory, measured (not asserted): results in bench/results/ (~15 minutes).
bench: $(STAMP) nginx bench/.venv-bento/.installed
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } || { echo "make bench needs wrk (apt-get install wrk)" >&2; exit 1; }
	$(PY) -m bench.run

# BentoML, the comparison point, in a virtualenv of its own (its pins are not ours); if it does not
# install, make bench runs without it and says so.
bench/.venv-bento/.installed:
	-$(PYTHON) -m venv bench/.venv-bento && bench/.venv-bento/bin/pip install --quiet "bentoml==1.4.*" \
	  "tensorflow-cpu==2.21.*" pillow && touch $@

## Convert the three models to OpenVINO ahead of serving (same weights setting as the fleet).
convert: $(STAMP)
	$(PY) -m common.convert_all

## On a machine with internet: the three ImageNet weight files into the Keras cache.
weights: $(STAMP)
	$(PY) -m common.fetch_weights

clean:
	rm -rf run .pytest_cache
