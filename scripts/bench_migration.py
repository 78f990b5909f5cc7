#!/usr/bin/env python3
"""Time, downtime, stream size, kernel memory and RSS of a live migration: see
:mod:`kvmmem.measure.bench_migration`."""

import sys

from kvmmem.measure.bench_migration import main

sys.exit(main())
