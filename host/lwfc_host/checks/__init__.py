"""Checks of the codec as a whole: the conformance vectors through every implementation (``lwfc conformance``)
and its speed (``lwfc bench``). They build their tables with ``lwfc_host.design``, which in turn uses
``lwfc_host.codec``, so they sit above both (no import circle)."""
