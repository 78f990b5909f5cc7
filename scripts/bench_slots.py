#!/usr/bin/env python3
"""Memslot metadata, time and memory returned of a virtio-mem device, by memslot mode.

The logic is :mod:`kvmmem.measure.bench_slots`."""

import sys

from kvmmem.measure.bench_slots import main

sys.exit(main())
