"""The quality benchmark's paired bootstrap: the interval it puts beside "READ above the probe"."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_sure_lead_has_an_interval_above_zero_and_no_lead_an_interval_around_it(quality):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    right = np.stack([labels] * 3)  # three seeds, every example right
    coin = rng.integers(0, 2, (3, 300))  # three seeds at chance
    sure = quality.paired_bootstrap("rte", "accuracy", labels, right, coin, reps=200)
    by_hand = 100.0 - 100.0 * (coin == labels).mean()  # accuracy is per example: the mean over seeds is exact
    assert sure["difference"] == pytest.approx(by_hand)
    assert 0 < sure["ci95"][0] < sure["difference"] < sure["ci95"][1] and sure["p_not_above"] == 0.0

    same = quality.paired_bootstrap("rte", "accuracy", labels, coin, coin, reps=200)
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0]  # paired: one resample scores both alike


def test_a_lead_of_a_few_examples_in_a_small_split_is_within_noise(quality):
    labels = np.array([0, 1] * 100)
    b = np.stack([np.where(np.arange(200) < 120, labels, 1 - labels)] * 3)  # 60% right
    a = b.copy()
    a[:, 120:133] = labels[120:133]  # a gets 13 examples right that b gets wrong ...
    a[:, :7] = 1 - labels[:7]  # ... and b 7 that a gets wrong: +3 points
    c = quality.paired_bootstrap("rte", "accuracy", labels, a, b, reps=500)
    assert c["difference"] == pytest.approx(3.0)
    assert c["ci95"][0] < 0 < c["ci95"][1]  # 13 against 7 discordant examples cannot rule out chance
    assert 0.05 < c["p_not_above"] < 0.5
