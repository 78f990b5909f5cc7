#!/usr/bin/env python3
"""Where a 128 MiB plug's host time goes, by memslot mode: see :mod:`kvmmem.measure.request_breakdown`."""

import sys

from kvmmem.measure.request_breakdown import main

sys.exit(main())
