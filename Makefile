# kvmmem: `make demo` runs the main job, `make test` runs the tests.
# Everything lives in a virtual environment inside the checkout (.venv).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXT    := kvmmem/.cffi-built
CDEFS  := $(wildcard cdefs/*.h) cdefs/build_kvm.py

.PHONY: all demo test test-slow bench bench-linux clean distclean linux-guest test-linux

include tests/guest/Makefile.inc

all: $(EXT) $(GUEST_ELF)

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

demo: $(EXT) $(GUEST_ELF)
	$(PY) -m kvmmem demo

# Static checks first (config in pyproject.toml), then the suite on both
# cores (pytest-xdist); the Linux tests
# (marker `linux`) are left to `make test-linux`, the slow ones to `make test-slow`.
test: $(EXT) $(GUEST_ELF)
	$(PY) -m ruff check
	$(PY) -m mypy --strict kvmmem
	$(PY) -m pytest -q -n 2 -m "not linux and not slow"

# Tests that wait on purpose: a throttled qemu-storage-daemon keeping I/O in
# flight across memslot changes, vhost-user reply deadlines, a soak with a
# back-end that comes and goes (marker `slow`).
test-slow: $(EXT) $(GUEST_ELF)
	$(PY) -m pytest -q -n 2 -m "slow and not linux"

# The Linux test kernel (issue 11): built once, then reused from ~/.cache/kvmmem/linux.
linux-guest:
	bash tests/linux/build-kernel.sh

# Boots that kernel under `kvmmem run` and resizes its virtio-mem devices;
# two guests at a time (pytest-xdist).
test-linux: $(EXT) linux-guest
	$(PY) -m pytest -q -m linux -n 2 tests/linux

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

# Memslot metadata, time and memory per mode (issue 7); results in bench-results/
bench: $(EXT) $(BENCH_STAMP)
	$(PY) scripts/bench_ioctl.py
	$(PY) scripts/bench_memory.py
	$(PY) scripts/bench_request_python.py
	$(PY) scripts/bench_request_breakdown.py
	$(PY) scripts/bench_vhost.py
	$(PY) scripts/bench_dirty_log.py
	$(PY) scripts/bench_migration.py
	$(PY) scripts/bench_slots.py --device-size 1T --plugged 0,1,16,64 --qemu --patterns \
		--json bench-results/slots-1t.json
	$(PY) scripts/bench_slots.py --device-size 64T --modes single,dynamic --plugged 0,1,16,64 \
		--no-overhead --json bench-results/slots-64t.json
	$(PY) scripts/plot_slots.py bench-results/slots-1t.json -o docs/slots-1t.png
	$(PY) scripts/bench_slots.py --from-json bench-results/slots-1t.json \
		bench-results/slots-64t.json --markdown docs/bench-slots.md

# Live migration of the Linux test kernel (issue 21), with QEMU 10's beside it
# where /opt/qemu10 holds one (kvmmem/measure/bench_qemu_migration.py says how)
QEMU10 := /opt/qemu10/usr/bin/qemu-system-x86_64
bench-linux: $(EXT) $(BENCH_STAMP) linux-guest
	$(PY) scripts/bench_migration.py --linux --device-sizes 1T,64T
	@if [ -x $(QEMU10) ]; then $(PY) scripts/bench_qemu_migration.py --qemu $(QEMU10); \
	else echo "QEMU 10 is not at $(QEMU10): its side is left out"; fi

clean:
	rm -rf build kvmmem/_kvm_cffi*.so kvmmem/_kvm_cffi.c $(EXT) .pytest_cache

distclean: clean
	rm -rf $(VENV) *.egg-info
