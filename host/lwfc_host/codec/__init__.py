"""Host codec: the vectorised decoder, the numpy/constriction encoder and vectorised context rule (``fast``),
the MicroPython bridge. Conformance and benchmarks are in ``lwfc_host.checks``."""
