# vitkit: `make demo` trains and evaluates the default model; `make test` runs the test suite.
# Both create .venv on first use and install what they need into it. `make mutate` runs mutation testing of the
# model math ([tool.mutmut] in pyproject.toml; MUTANTS='vitkit.models.vit.*' narrows it); it is not part of `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The pinned PyTorch pair of the test environment (a CUDA build that also runs on the CPU).
TORCH   := torch==2.14.1 torchvision==0.29.1
# Every other test and reference dependency (timm, transformers, onnx, ...) at the version the suite was run with.
PINS    := -c constraints.txt
STAMP   := $(VENV)/.installed

.PHONY: demo test bench install clean mutate

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip $(PINS)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q $(TORCH) $(PINS)
	$(BIN)/python -m pip install -q -e '.[dev]' $(PINS)
	@# the browser test of `vitkit serve`'s page drives the system chromium (Playwright's own browser download is
	@# not used); without apt (or root) the test skips, or fails under VITKIT_REQUIRE_DEPS=1 as CI runs it
	command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } } || \
		echo "make: chromium not installed (no apt-get or no permission): the browser test will skip"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=25 $(PYTEST_ARGS)

# Niced, two workers, one thread each: the machine stays usable. The table counts each file's mutants by outcome.
MUTANTS ?=
mutate: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 19 $(BIN)/mutmut run --max-children 2 $(MUTANTS)
	@$(BIN)/mutmut results --all true | awk -F': ' '{ m = $$1; sub(/^ +/, "", m); sub(/\.x(_|ǁ).*/, "", m); \
		n[m]++; c[m, $$2]++; s[$$2] = 1 } END { printf "%-28s %6s", "module", "total"; \
		for (k in s) printf " %10s", k; print ""; for (m in n) { printf "%-28s %6d", m, n[m]; \
		for (k in s) printf " %10d", c[m, k]; print "" } }' | sort

demo: $(STAMP)
	$(BIN)/vitkit train --data mnist5k --name demo --overwrite
	$(BIN)/vitkit eval runs/demo --data mnist5k

bench: $(STAMP)
	$(BIN)/python benchmarks/infer.py
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/highres.py
	$(BIN)/python benchmarks/retrieval.py
	$(BIN)/python benchmarks/pointing.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/gpu.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
