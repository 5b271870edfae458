"""Per-dimension adaptation weights: emotion-heavy dimensions keep the population's statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from stream_ser.adaptation import StreamBaseline
from stream_ser.errors import ModelError
from stream_ser.specialist import AdaptationCard

RAW = {"warmup_utterances": 1, "prior_weight": 2.0, "population_mean": [0.0, 1.0, 2.0],
       "population_std": [1.0, 2.0, 3.0]}  # fmt: skip


def baseline_after(raw: dict[str, Any], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stream = StreamBaseline(AdaptationCard.from_dict(raw, "test"))
    for value in values:
        stream.update(value)
    current = stream.current()
    assert current is not None
    return current.mean.astype(np.float64), current.std.astype(np.float64)


def test_weights_blend_the_stream_with_the_population() -> None:
    values = np.array([[3.0, 5.0, -1.0], [5.0, 9.0, 1.0], [4.0, 7.0, 0.0]])
    full_mean, full_std = baseline_after(RAW, values)
    mean, std = baseline_after(RAW | {"adapt_weights": [1.0, 0.0, 0.5]}, values)
    np.testing.assert_allclose(mean[0], full_mean[0], rtol=1e-6)  # adapts fully
    np.testing.assert_allclose(std[0], full_std[0], rtol=1e-6)
    assert (mean[1], std[1]) == pytest.approx((1.0, 2.0))  # keeps the population
    assert mean[2] == pytest.approx((full_mean[2] + 2.0) / 2, rel=1e-6)
    assert std[2] ** 2 == pytest.approx((full_std[2] ** 2 + 9.0) / 2, rel=1e-5)
    assert full_mean[1] != pytest.approx(1.0)  # the full rule did move that dimension


@pytest.mark.parametrize("weights", [[1.0, 0.0], [1.0, 2.0, 0.0], [0.5, float("nan"), 1.0]])
def test_invalid_weights_are_refused(weights: list[float]) -> None:
    with pytest.raises(ModelError, match="adapt_weights"):
        AdaptationCard.from_dict(RAW | {"adapt_weights": weights}, "test")
