# The README's two commands: `make demo` and `make test`. Each creates .venv if
# missing and installs what it needs (torch pinned to the CPU build first, then
# eproj editable with its extras); afterwards .venv/bin/eproj is the CLI.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# The dev and CI build compiles the CUDA kernels too (it needs nvcc; `make install
# EPROJ_CUDA=OFF` builds the C++ kernels alone). A plain `pip install .` is C++ only.
EPROJ_CUDA ?= ON

.PHONY: demo test install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

KERNEL_SOURCES := $(wildcard cpp_ext/CMakeLists.txt cpp_ext/*.cpp cpp_ext/*.in cpp_ext/*/*.cpp cpp_ext/*/*.cu cpp_ext/*/*.cuh cpp_ext/*/*.h cpp_ext/include/eproj/*.h)

# rebuilt (and the kernels recompiled) when the build files or kernel sources change
$(STAMP): pyproject.toml CMakeLists.txt $(KERNEL_SOURCES) | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0
	# EPROJ_CUDA_SIM=ON: also the simulated CUDA device (cpp_ext/sim) that `make test` runs the CUDA kernels on
	$(VENV)/bin/python -m pip install --quiet -e ".[test]" -Ccmake.define.EPROJ_CUDA=$(EPROJ_CUDA) \
		-Ccmake.define.EPROJ_CUDA_SIM=ON
	@$(VENV)/bin/python -c "import eproj.cpp_ext as k; print('eproj kernels built:', k.build_info())"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/eproj demo --out demo-out

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out build
