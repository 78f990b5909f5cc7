#!/usr/bin/env python3
"""Cost of one memslot change through kvmmem against the bare ioctl: see :mod:`kvmmem.measure.bench_ioctl`."""

import sys

from kvmmem.measure.bench_ioctl import main

sys.exit(main())
