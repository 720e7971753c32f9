"""Host design: calibration, clipping, quantizers, entropy models, contexts, table design and files, rate
targeting, the rate-distortion report, task-aware design."""
