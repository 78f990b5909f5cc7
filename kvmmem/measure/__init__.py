"""Measurement apart from the VMM: kernel memory charged in memory cgroups
(``cgroups``, ``kmem``), the ``kvmmem demo`` replay (``demo``, driven by the
test guest or by ``host_driver``) and the benchmarks that ``scripts/`` runs
(``bench_*``, ``plot_slots``)."""
