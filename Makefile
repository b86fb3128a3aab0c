# make demo  : set up .venv and run the pipeline end to end on the built-in shapes data, with the schedule
#              whose pictures are recognisable (outputs/demo/; 18-22 min from a fresh clone on 2 cores with AVX512-BF16,
#              about 56 min on 2 cores without native bf16, 2026-12-06; the demo says which at its start)
# make demo-fast : every stage small, a quick look at the whole pipeline; colours and positions right, shapes blurred (outputs/fast/)
# make test  : set up .venv and run the test suite
# make bench : throughput benchmarks (results in bench/results.md)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export WANDB_MODE ?= offline
export HYDRA_FULL_ERROR ?= 0

.PHONY: setup demo demo-fast test bench clean

# $(call install,PYTHON,ARGS): install ARGS into PYTHON's venv with uv (pinned in constraints.txt), which unpacks
# the ~6 GB of wheels in parallel and hard-links them from its cache instead of copying them (README, "Two
# commands"). It compiles the bytecode as pip does: uv's default leaves that to the first import, and where
# PYTHONDONTWRITEBYTECODE is set no import ever writes it, so every process (each test's `python train.py`)
# would compile torch and lightning anew: ~18 s an import instead of ~8. pip does the install where uv cannot be fetched or fails.
install = ($(1) -m pip install --quiet -c constraints.txt uv \
	  && $(1) -m uv pip install --quiet --link-mode=hardlink --compile-bytecode --python $(1) $(2)) \
	|| ($(1) -m pip install --quiet --upgrade pip && $(1) -m pip install --quiet $(2))

setup: $(STAMP)

# Reinstalls only when the dependency list or the pins change.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python >= 3.10); set PYTHON=..."; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call install,$(PY),-c constraints.txt -e '.[dev]')
	touch $(STAMP)

demo: setup
	$(PY) -m unclip.demo

demo-fast: setup
	$(PY) -m unclip.demo profile=fast

test: setup
	$(PY) -m pytest -q

# dalle2-pytorch pins old libraries (open_clip_torch < 3): it lives in its own venv, used only by bench/
PEER := bench/.venv-peer
$(PEER)/.installed: bench/peer-requirements.txt constraints.txt
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(call install,$(PEER)/bin/python,-c constraints.txt -r bench/peer-requirements.txt)
	touch $@

bench: setup $(PEER)/.installed
	$(PY) -m bench.run

clean:
	rm -rf outputs multirun
