"""Host codec: the vectorised decoder, the numpy/constriction encoder and vectorised context rule (``fast``),
concealment of the parts of a sliced tensor that never arrived (``conceal``), the MicroPython bridge.
Conformance and benchmarks are in ``lwfc_host.checks``."""
