# vitkit: `make demo` trains and evaluates the default model; `make test` runs the test suite.
# Both create .venv on first use and install what they need into it.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The pinned PyTorch pair of the test environment (a CUDA build that also runs on the CPU).
TORCH   := torch==2.14.1 torchvision==0.29.1
# Every other test and reference dependency (timm, transformers, onnx, ...) at the version the suite was run with.
PINS    := -c constraints.txt
STAMP   := $(VENV)/.installed

.PHONY: demo test bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip $(PINS)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q $(TORCH) $(PINS)
	$(BIN)/python -m pip install -q -e '.[dev]' $(PINS)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/vitkit train --data mnist5k --name demo --overwrite
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
