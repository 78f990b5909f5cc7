#!/usr/bin/env python3
"""I/O pause per memslot change next to a busy vhost-user disk, and KVM metadata by
mode with the disk attached: see :mod:`kvmmem.measure.bench_vhost`."""

import sys

from kvmmem.measure.bench_vhost import main

sys.exit(main())
