"""Learning fusion settings on a development set: temperatures, then weights.

All fits minimise the negative log-likelihood (NLL) of the true labels, by grid search:
few parameters, no dependency beyond numpy, and the same answer every time. The NLL is taken on
the labels eval scores (`scored`: the development set's labels), each distribution restricted to
them and renormalised, exactly as `stream-ser eval` scores a manifest with fewer labels than the
model; mass on labels that are never scored does not pull the fit.
1. Temperature per source: the T in [0.1, 10] (log grid) that minimises the source's own NLL.
2. Global weights: a grid over the weight simplex (step 0.05; coordinate ascent beyond three
   sources) minimising the fused NLL.
3. Optional per-class weights: coordinate ascent over a factor grid per (source, label).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from stream_ser.fusion import FLOOR, FusionConfig, SourceFusion, align, fuse, temper

Distribution = Mapping[str, float]
TEMPERATURES = np.geomspace(0.1, 10.0, 81)
CLASS_FACTORS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
GRID_SEARCH_SOURCES = 3
"""Up to this many sources the global weights are searched on a full grid."""


def nll(
    fused: Sequence[np.ndarray], truth: Sequence[int], scored: np.ndarray | None = None
) -> float:
    """Mean negative log-likelihood of the true label indices; with `scored` (a boolean mask
    over the labels) each distribution is first restricted to the scored labels."""
    losses = []
    for p, t in zip(fused, truth, strict=True):
        mass = float(p[scored].sum()) if scored is not None else 1.0
        losses.append(np.log(max(p[t] / max(mass, FLOOR), FLOOR)))
    return float(-np.mean(losses))


def scored_mask(labels: Sequence[str], scored: Sequence[str] | None) -> np.ndarray | None:
    """Boolean mask of the scored labels over `labels` (None: all are scored)."""
    if scored is None:
        return None
    return np.array([label in set(scored) for label in labels])


def fit_temperature(
    distributions: Sequence[Distribution],
    truth: Sequence[str],
    source: SourceFusion,
    labels: Sequence[str],
    name: str,
    scored: Sequence[str] | None = None,
) -> float:
    """The temperature that minimises this source's NLL on the labels it covers (restricted
    to the `scored` labels when given)."""
    aligned = [align(d, source, labels, name) for d in distributions]
    index = {label: i for i, label in enumerate(labels)}
    usable = [(a, index[t]) for a, t in zip(aligned, truth, strict=True) if a.covered[index[t]]]
    if not usable:
        return 1.0
    mask = scored_mask(labels, scored)
    losses = [
        nll(
            [temper(a.probabilities, a.covered, float(t)) for a, _ in usable],
            [i for _, i in usable],
            mask,
        )
        for t in TEMPERATURES
    ]
    return float(TEMPERATURES[int(np.argmin(losses))])


def calibrate(
    per_source: Mapping[str, Sequence[Distribution]],
    truth: Sequence[str],
    base: FusionConfig,
    per_class: bool = False,
    scored: Sequence[str] | None = None,
) -> FusionConfig:
    """Fit temperatures and weights of every source in `per_source` on (distributions, truth);
    the NLL is taken on the `scored` labels (default: all output labels)."""
    names = list(per_source)
    mask = scored_mask(base.labels, scored)
    sources = {
        name: replace(
            base.source(name),
            temperature=fit_temperature(
                per_source[name], truth, base.source(name), base.labels, name, scored
            ),
            weight=1.0,
            class_weights={},
        )
        for name in names
    }
    config = replace(base, sources=sources)
    config = _fit_global_weights(config, per_source, truth, mask)
    if per_class:
        config = _fit_class_weights(config, per_source, truth, mask)
    return config


def _loss(
    config: FusionConfig,
    per_source: Mapping[str, Sequence[Distribution]],
    truth: Sequence[str],
    mask: np.ndarray | None,
) -> float:
    index = {label: i for i, label in enumerate(config.labels)}
    active = [name for name in per_source if config.source(name).weight > 0]
    if not active:
        return float("inf")
    fused = []
    for item in range(len(truth)):
        try:
            fused.append(fuse({name: per_source[name][item] for name in active}, config)[0])
        except ValueError:  # every weight for this item is 0
            return float("inf")
    return nll(fused, [index[t] for t in truth], mask)


def _with_weights(config: FusionConfig, weights: Mapping[str, float]) -> FusionConfig:
    sources = {name: replace(config.source(name), weight=w) for name, w in weights.items()}
    return replace(config, sources={**config.sources, **sources})


def _fit_global_weights(
    config: FusionConfig,
    per_source: Mapping[str, Sequence[Distribution]],
    truth: Sequence[str],
    mask: np.ndarray | None,
) -> FusionConfig:
    names = list(per_source)
    if len(names) == 1:
        return _with_weights(config, {names[0]: 1.0})
    if len(names) <= GRID_SEARCH_SOURCES:
        steps = 20
        candidates = [
            dict(zip(names, (c / steps for c in combo), strict=True))
            for combo in itertools.product(range(steps + 1), repeat=len(names))
            if sum(combo) == steps
        ]
        return min(
            (_with_weights(config, w) for w in candidates),
            key=lambda c: _loss(c, per_source, truth, mask),
        )
    best = _with_weights(config, dict.fromkeys(names, 1.0 / len(names)))
    for _ in range(3):
        for name in names:
            options = [_with_weights(best, {name: w}) for w in np.linspace(0, 1, 11)]
            best = min(options, key=lambda c: _loss(c, per_source, truth, mask))
    return best


def _fit_class_weights(
    config: FusionConfig,
    per_source: Mapping[str, Sequence[Distribution]],
    truth: Sequence[str],
    mask: np.ndarray | None,
) -> FusionConfig:
    best = config
    for _ in range(2):
        for name in per_source:
            for label in config.labels:
                options = []
                for factor in CLASS_FACTORS:
                    source = best.source(name)
                    factors = {**source.class_weights, label: factor}
                    options.append(
                        replace(
                            best,
                            sources={**best.sources, name: replace(source, class_weights=factors)},
                        )
                    )
                best = min(options, key=lambda c: _loss(c, per_source, truth, mask))
    return best
