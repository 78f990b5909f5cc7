#!/usr/bin/env python3
"""Which kvmmem code one virtio-mem request runs, traced with ``sys.setprofile``.

The logic is :mod:`kvmmem.measure.trace_request`."""

import sys

from kvmmem.measure.trace_request import main

sys.exit(main())
