"""Shared fixtures: small real tables and tensors made with the provisional table maker."""

from __future__ import annotations

import numpy as np
import pytest

from lwfc.tables import Tables
from lwfc_host.bench import relu_tensor
from lwfc_host.tablegen import uniform_table


def make_case(shape=(8, 8, 16), levels=4, groups=1, classes=1, seed=0):
    """(table dict, Tables, int8 tensor) for a ReLU-like layer of the given shape."""
    calib = relu_tensor(shape, seed=seed, batch=3)
    table = uniform_table(calib, levels, clip_max=float(np.quantile(calib[calib > 0], 0.99)),
                          groups=groups, classes=classes)
    tables = Tables(table)
    x = relu_tensor(shape, seed=seed + 100)
    scale, zp = table["int8"]["scale"], table["int8"]["zero_point"]
    q = np.clip(np.round(x / scale) + zp, -128, 127).astype(np.int8)
    return table, tables, q


@pytest.fixture(scope="session")
def case_contexts():
    return make_case(groups=4, classes=3)


@pytest.fixture(scope="session")
def case_planar():
    return make_case(groups="channel", classes=1)
