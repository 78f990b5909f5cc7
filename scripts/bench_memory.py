#!/usr/bin/env python3
"""Commit cost of the memory model on real KVM: see :mod:`kvmmem.measure.bench_memory`."""

import sys

from kvmmem.measure.bench_memory import main

sys.exit(main())
