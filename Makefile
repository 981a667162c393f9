# Two commands for a newcomer: `make run` (the whole fleet) and `make test` (the whole suite).
# Each sets up what it needs: a virtualenv with the project's packages, and Nginx.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PEERS  := bench/.venv-bento/.installed bench/.venv-litserve/.installed bench/.venv-mlserver/.installed

.PHONY: run test test-fast lint bench profile perf-analyzer convert weights hierarchy nginx redis chromium docker wordnet secrets clean docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# $(call need,<check that succeeds when it is installed>,<Debian packages>): install the packages
# with apt when the check fails and we are root; otherwise say what to run.
need = @{ $(1); } >/dev/null 2>&1 || { \
  if [ "$$(id -u)" = 0 ]; then \
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
  else \
    echo "missing: run 'sudo apt-get install $(2)'" >&2; exit 1; \
  fi; }

# Nginx for the fleet; redis-server for the shared rate-limit and cache tests; headless Chromium
# and its driver for the web-page test.
nginx:
	$(call need,command -v nginx || test -x /usr/sbin/nginx,nginx-light)
redis:
	$(call need,command -v redis-server,redis-server)
chromium:
	$(call need,command -v chromedriver,chromium chromium-driver)
# Debian's Docker engine, Compose v1 and debootstrap for the compose tests (tests/e2e/test_compose.py
# starts its own dockerd and makes the images' base from Debian's packages).
# WordNet 3.0's database, the source of the ImageNet label hierarchy (make hierarchy; its test).
wordnet:
	$(call need,test -f /usr/share/wordnet/data.noun,wordnet-base)
docker:
	$(call need,test -x /usr/sbin/dockerd && test -x /usr/bin/docker-compose && test -x /usr/sbin/debootstrap,docker.io docker-compose debootstrap)

## The whole fleet in the foreground: Nginx :8080 -> gateway :8000 -> vgg16/resnet50/inceptionv3.
run: $(STAMP) nginx redis
	$(PY) -m deploy.local.fleet

## The whole suite, end-to-end tests and the compose fleet included (~20 minutes on 2 cores); the
## docs build first.
test: $(STAMP) nginx redis chromium docker wordnet
	$(VENV)/bin/mkdocs build --strict -q --site-dir run/site
	$(PY) -m pytest

## The documentation site (docs/, mkdocs.yml) into run/site/; --strict: a broken link fails it.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir run/site

## Unit tests only (no fleet, no full-size models).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not e2e and not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy common serving fleet gateway deploy client workers

## Speed and memory, measured (not asserted): results in bench/results/ (about 80 minutes, a 30-minute soak included).
bench: $(STAMP) nginx redis docker $(PEERS) perf-analyzer
	$(call need,command -v wrk,wrk)
	$(PY) -m bench.run

## Where Nginx's and the gateway's time goes, with stub models (bench/results/profile.md).
profile: $(STAMP) nginx redis
	$(call need,command -v wrk,wrk)
	$(PY) -m bench.profile

# The peers make bench compares the fleet with - BentoML, LitServe, MLServer - each in a virtualenv
# of its own (their pins are not ours), each serving the fleet's ResNet50 IR on the OpenVINO that
# .venv runs (the same version: the same IR, the same runtime). One that does not install is
# skipped by make bench, which says so. Reinstalled when .venv or the Makefile changes (pip keeps
# what is already there, so that takes seconds).
PEER_OPENVINO = $(shell $(PY) -c "import importlib.metadata as m; print(m.version('openvino'))" 2>/dev/null)
PEER_COMMON = "openvino==$(PEER_OPENVINO)" "pillow>=11,<14" "numpy>=1.26,<3"
bench/.venv-bento/.installed: $(STAMP) Makefile
	-$(PYTHON) -m venv bench/.venv-bento && bench/.venv-bento/bin/pip install --quiet "bentoml==1.4.*" \
	  $(PEER_COMMON) && touch $@
bench/.venv-litserve/.installed: $(STAMP) Makefile
	-$(PYTHON) -m venv bench/.venv-litserve && bench/.venv-litserve/bin/pip install --quiet \
	  "litserve==0.2.*" "python-multipart<1" $(PEER_COMMON) && touch $@
# uvloop<0.22: with 0.22, MLServer 1.7's inference workers die at start (SeldonIO/MLServer#2286).
bench/.venv-mlserver/.installed: $(STAMP) Makefile
	-$(PYTHON) -m venv bench/.venv-mlserver && bench/.venv-mlserver/bin/pip install --quiet \
	  "mlserver==1.7.*" "uvloop<0.22" $(PEER_COMMON) && touch $@

# NVIDIA's perf_analyzer (in the tritonclient wheel .venv has) links libb64.so.0d (Debian's
# libb64-0d) and libcudart.so.12 even against a CPU server: the latter from the
# nvidia-cuda-runtime-cu12 wheel, installed into bench/.perf-analyzer (bench.perf_analyzer puts
# it on LD_LIBRARY_PATH). If it does not install, make bench runs without perf_analyzer, saying so.
perf-analyzer: $(STAMP)
	-$(call need,test -e /usr/lib/x86_64-linux-gnu/libb64.so.0d || ldconfig -p | grep -q libb64.so.0d,libb64-0d)
	-test -e bench/.perf-analyzer/nvidia/cuda_runtime/lib/libcudart.so.12 || \
	  $(PY) -m pip install --quiet --no-deps --target bench/.perf-analyzer "nvidia-cuda-runtime-cu12==12.*"

## Convert the three models to OpenVINO ahead of serving (same weights setting as the fleet).
convert: $(STAMP)
	$(PY) -m services.convert_all

## The ImageNet classes' hypernym graph, derived from WordNet 3.0 into common/data/imagenet_hierarchy.json.
hierarchy: $(STAMP) wordnet
	$(PY) -m common.wordnet

## On a machine with internet: the three ImageNet weight files into the Keras cache.
weights: $(STAMP)
	$(PY) -m services.fetch_weights

## For docker compose: the admin key, the Redis password and the callbacks' signing key, each
## random, written once into run/secrets/ and never replaced. The folder is the owner's alone (0700);
## the files are 0644 because compose bind-mounts them as they are, and the containers' non-root
## user must read them.
SECRETS ?= run/secrets
secrets:
	@mkdir -p $(SECRETS) && chmod 700 $(SECRETS)
	@for name in admin_key redis_password callback_secret; do \
	  [ -s $(SECRETS)/$$name ] || $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(32))' > $(SECRETS)/$$name; \
	  chmod 644 $(SECRETS)/$$name; \
	done
	@echo "secrets in $(SECRETS)/ (the admin key: $(SECRETS)/admin_key)"

clean:
	rm -rf run .pytest_cache
