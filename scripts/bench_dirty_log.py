#!/usr/bin/env python3
"""Kernel memory, VMM RSS and time of dirty logging: see :mod:`kvmmem.measure.bench_dirty_log`."""

import sys

from kvmmem.measure.bench_dirty_log import main

sys.exit(main())
