"""Host codec: the vectorised decoder, the numpy/constriction encoder, conformance, the MicroPython bridge, benches."""
