"""What an evaluation produces: rate points (``Point``) and the whole run (``Evaluation``), as saved in
evaluation.json and read back by the report (``report.load_evaluation``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lwfc_host.evaluate.plans import Plan


@dataclass
class Point:
    """One rate point of one method, measured on every evaluation tensor."""

    method: str
    setting: str
    bits_per_element: float  # 8 x all bytes sent per tensor / elements, averaged over tensors
    metrics: dict[str, float]
    encode_ms: float
    decode_ms: float
    tensors: int
    bits_per_element_no_param_sets: float = math.nan  # HEVC: without the repeated VPS/SPS/PPS
    mse: float = math.nan
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    """Every point of one ``lwfc eval`` run, with what they were measured on and against."""

    bundle: dict  # bundle.json's content
    bundle_dir: str
    dataset: str
    plan: Plan
    points: list[Point]
    reference: dict[str, float]  # the float model and the uncompressed int8 pipeline on the same images
    primary: str
    shape: tuple[int, int, int]
    tensors: int
    description: str
    seconds: dict[str, float]
    hevc_single_process_ms: dict[str, float]
    edge_cache: str = ""
    command: str = ""
    metric: str = "classification"
    metric_description: str = ""
    method_seconds: dict[str, float] = field(default_factory=dict)  # per method, summed over the workers
    jobs: int = 1
    # peak resident memory in MB of the run's largest process (streaming.peak_rss_mb); NaN in evaluations written
    # before it was recorded
    peak_rss_mb: float = math.nan

    def to_json(self) -> dict:
        """Plain JSON-able data (dataclasses turned into dicts)."""
        return asdict(self)
