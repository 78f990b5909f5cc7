#!/usr/bin/env python3
"""What kvmmem costs per memslot change, against the bare ioctl: see :mod:`kvmmem.measure.bench_overhead`."""

import sys

from kvmmem.measure.bench_overhead import main

sys.exit(main())
