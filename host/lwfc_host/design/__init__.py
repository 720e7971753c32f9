"""Host design: calibration, clipping, quantizers, entropy models, contexts, table files."""
