"""Prometheus text → samples, and the arithmetic of the monitor: deltas between scrapes, histogram quantiles.

The parser is a small one of the text exposition format (``name{label="value",…} value [timestamp]``). It keeps
every sample under the name it has in the text: prometheus_client's parser renames counter samples to
``…_total``, which Triton's counters (``nv_inference_count``) do not have.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

LabelKey = tuple[tuple[str, str], ...]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_UNESCAPE = re.compile(r"\\(.)")


def parse_text(text: str) -> dict[str, dict[LabelKey, float]]:
    """Samples of a Prometheus text exposition: ``{name: {labels: value}}``. Malformed lines are skipped."""
    out: dict[str, dict[LabelKey, float]] = defaultdict(dict)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, raw_labels, raw_value = match.groups()
        labels: dict[str, str] = {}
        pos = 0
        raw_labels = (raw_labels or "").strip()
        while pos < len(raw_labels):
            lm = _LABEL.match(raw_labels, pos)
            if lm is None:
                break
            labels[lm.group(1)] = _UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), lm.group(2))
            pos = lm.end()
        if pos < len(raw_labels):
            continue
        try:
            value = float(raw_value)
        except ValueError:
            continue
        out[name][tuple(sorted(labels.items()))] = value
    return dict(out)


@dataclass(frozen=True)
class Scrape:
    """Every sample of one scrape: ``values[name][labels] = value`` (labels as a sorted tuple of pairs)."""

    time: float
    values: Mapping[str, Mapping[LabelKey, float]]

    @classmethod
    def parse(cls, text: str, time: float) -> Scrape:
        return cls(time, parse_text(text))

    def series(self, name: str,
               where: Callable[[dict[str, str]], bool] | None = None) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of every series of ``name`` whose labels pass ``where``."""
        out = []
        for key, value in self.values.get(name, {}).items():
            labels = dict(key)
            if where is None or where(labels):
                out.append((labels, value))
        return out

    def total(self, name: str, group_by: Iterable[str] = (),
              where: Callable[[dict[str, str]], bool] | None = None) -> dict[tuple[str, ...], float]:
        """Sum of ``name`` grouped by the labels ``group_by`` (an empty tuple key when ``group_by`` is empty)."""
        keys = tuple(group_by)
        out: dict[tuple[str, ...], float] = defaultdict(float)
        for labels, value in self.series(name, where):
            out[tuple(labels.get(k, "") for k in keys)] += value
        return dict(out)

    def histogram(self, name: str, group_by: Iterable[str],
                  where: Callable[[dict[str, str]], bool] | None = None) -> dict[tuple[str, ...], Histogram]:
        """The histogram ``name`` (``_bucket``/``_sum``/``_count`` series) summed by ``group_by`` labels."""
        keys = tuple(group_by)
        buckets: dict[tuple[str, ...], dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for labels, value in self.series(name + "_bucket", where):
            buckets[tuple(labels.get(k, "") for k in keys)][float(labels["le"])] += value
        sums = self.total(name + "_sum", keys, where)
        counts = self.total(name + "_count", keys, where)
        return {k: Histogram(tuple(sorted(b.items())), sums.get(k, 0.0), counts.get(k, 0.0))
                for k, b in buckets.items()}


@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets ``((le, count), …)`` sorted by ``le`` (the last is +Inf), sum and count."""

    buckets: tuple[tuple[float, float], ...]
    sum: float
    count: float

    def minus(self, earlier: Histogram | None) -> Histogram:
        """The observations since ``earlier`` (same buckets). A counter reset (restart) gives self."""
        if earlier is None or earlier.count > self.count:
            return self
        before = dict(earlier.buckets)
        return Histogram(tuple((le, c - before.get(le, 0.0)) for le, c in self.buckets), self.sum - earlier.sum,
                         self.count - earlier.count)

    def quantile(self, q: float) -> float | None:
        """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket; None without data.

        A quantile in the +Inf bucket is reported as the highest finite bound (as Prometheus does).
        """
        if not self.buckets or self.buckets[-1][1] <= 0:
            return None
        total = self.buckets[-1][1]
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for le, count in self.buckets:
            if count >= rank:
                if math.isinf(le):
                    return lower_bound
                if count == lower_count:
                    return le
                return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
            lower_bound, lower_count = le, count
        return lower_bound

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None


def delta(now: Mapping[tuple[str, ...], float], before: Mapping[tuple[str, ...], float] | None
          ) -> dict[tuple[str, ...], float]:
    """Counter increase per key since ``before`` (a key missing before, or a reset, counts from zero)."""
    if before is None:
        return dict(now)
    out = {}
    for key, value in now.items():
        prev = before.get(key, 0.0)
        out[key] = value - prev if value >= prev else value
    return out
