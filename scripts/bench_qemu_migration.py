#!/usr/bin/env python3
"""QEMU 10's live migration of the Linux test kernel (time, downtime, stream
size, kernel memory, RSS, restore), beside kvmmem's: see
:mod:`kvmmem.measure.bench_qemu_migration`."""

import sys

from kvmmem.measure.bench_qemu_migration import main

sys.exit(main())
