"""Rate-accuracy evaluation (``lwfc eval``), following the data: ``plans`` (which rate points) -> ``edge_cache``
(the int8 edge outputs, once) -> ``lwfc_points`` and ``baseline_points`` (codecs from ``baselines``), run as
tasks by ``pool`` -> ``metrics`` -> ``results`` -> ``report``; ``run.evaluate_bundle`` drives them.
``context_bench`` holds the measurements behind the context design."""
