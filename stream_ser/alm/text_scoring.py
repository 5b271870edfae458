"""The text-level baseline: the model writes a distribution, and the text is parsed.

The logits paper compares token-level distributions (what stream-ser uses by default) with asking
the model to write one. With `scoring = "text"` the generative backends ask the templates file's
`distribution` question and parse the answer by this rule:

1. For each label, the first number after the label word (case-insensitive, whole word; a quote,
   `:`, `=` or `-` may stand between): "angry: 40%", "\"angry\": 0.4", "angry = 40".
2. If any number carries a `%` or the numbers sum to more than 1.5 they are percentages.
3. Labels without a number get 0; the numbers are renormalised to sum to 1.
4. No number for any label, or a zero total, is a ModelError naming the text (the utterance's
   result is then flagged, as for any model failure): a distribution is never invented.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from stream_ser.errors import ModelError

PERCENT_TOTAL = 1.5  # an answer whose numbers add up to more is in percent


def _pattern(label: str) -> re.Pattern[str]:
    return re.compile(
        rf"\b{re.escape(label)}\b[\"']?\s*[:=\-]?\s*(\d+(?:\.\d+)?)\s*(%?)", re.IGNORECASE
    )


def parse(labels: Sequence[str], text: str, source: str = "alm") -> dict[str, float]:
    """The written distribution over `labels` (rule in the module docstring)."""
    values: dict[str, float] = {}
    percent = False
    for label in labels:
        found = _pattern(label).search(text)
        if found is not None:
            values[label] = float(found.group(1))
            percent = percent or found.group(2) == "%"
    total = sum(values.values())
    if not values or total <= 0:
        raise ModelError(f"{source}: no distribution over the labels in the answer {text[:120]!r}")
    if percent or total > PERCENT_TOTAL:
        values = {label: value / 100 for label, value in values.items()}
        total /= 100
    return {label: values.get(label, 0.0) / total for label in labels}
