# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_HOME ?= $(CURDIR)/.prefect
# OpenMP threads yield instead of spinning: on 2 shared cores spinning made convolutions ~10x slower
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install system-deps test test-all demo bench clean

# torch + torchvision: the pair that imports together here (see README, "Install notes").
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# Fashion-MNIST (demo, benchmarks) and Chromium (gallery browser test) come from Debian.
system-deps:
	@if [ -d /usr/share/datasets/fashion-mnist ] && [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist chromium >/dev/null 2>&1)) || \
	  echo "warning: could not apt-get install dataset-fashion-mnist chromium; tests that need them will skip"; \
	else echo "note: install Debian packages dataset-fashion-mnist and chromium for the full test suite"; fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) system-deps
	$(PY) -m pytest -q

demo: $(STAMP) system-deps
	$(VENV)/bin/webkd demo

clean:
	rm -rf runs .prefect .pytest_cache
