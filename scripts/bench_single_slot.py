#!/usr/bin/env python3
"""Kernel memory and creation time of one KVM memslot, by size: see :mod:`kvmmem.measure.bench_single_slot`."""

import sys

from kvmmem.measure.bench_single_slot import main

sys.exit(main())
