#!/usr/bin/env python3
"""Where a virtio-mem request's overhead over the bare ioctl comes from.

The logic is :mod:`kvmmem.measure.bench_request_python`."""

import sys

from kvmmem.measure.bench_request_python import main

sys.exit(main())
