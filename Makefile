# kvmmem: `make demo` runs the main job, `make test` runs the tests.
# Everything lives in a virtual environment inside the checkout (.venv).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXT    := kvmmem/.cffi-built
CDEFS  := $(wildcard cdefs/*.h) cdefs/build_kvm.py

.PHONY: all demo test bench clean distclean

all: $(EXT)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The editable install builds the extension once; this rebuilds it in place
# whenever the C declarations change.
$(EXT): $(STAMP) $(CDEFS)
	$(PY) cdefs/build_kvm.py
	touch $@

demo: $(EXT)
	$(PY) -m kvmmem demo

test: $(EXT)
	$(PY) -m pytest -q

bench: $(EXT)
	$(PY) scripts/bench_ioctl.py

clean:
	rm -rf build kvmmem/_kvm_cffi*.so kvmmem/_kvm_cffi.c $(EXT) .pytest_cache

distclean: clean
	rm -rf $(VENV) *.egg-info
