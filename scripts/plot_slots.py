#!/usr/bin/env python3
"""The plot of scripts/bench_slots.py's JSON: see :mod:`kvmmem.measure.plot_slots`."""

import sys

from kvmmem.measure.plot_slots import main

sys.exit(main())
