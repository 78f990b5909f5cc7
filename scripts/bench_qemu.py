#!/usr/bin/env python3
"""QEMU's kernel memory with an idle virtio-mem device, for comparison: see :mod:`kvmmem.measure.bench_qemu`."""

import sys

from kvmmem.measure.bench_qemu import main

sys.exit(main())
