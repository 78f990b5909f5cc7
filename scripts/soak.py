#!/usr/bin/env python3
"""Soak: the VMM's RSS, file descriptors, threads and memslots stay flat.

The logic is :mod:`kvmmem.measure.soak`."""

import sys

from kvmmem.measure.soak import main

sys.exit(main())
