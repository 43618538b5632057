"""Retry policy: exponential backoff with jitter on connection errors and 503, honouring ``Retry-After``.

4xx answers are never retried (the request itself is wrong; sending it again cannot help), nor are 5xx other
than 503 (``backend_error``/``internal_error`` mean the backend failed on this input). Detection is a pure
function of the request, so retrying a POST is safe.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass, field

import httpx

RETRYABLE_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpx.ConnectError,          # refused, DNS, unreachable
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ReadError,             # connection reset while reading
    httpx.WriteError,
    httpx.RemoteProtocolError,   # the server closed a kept-alive connection (restarts, idle timeouts)
)
"""Transport errors after which the request is sent again. Read timeouts are not, unless
``RetryPolicy.retry_read_timeouts``: a slow server is better not sent the same work twice."""


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a request again.

    Attributes:
        max_attempts: total tries including the first (1 = no retries).
        backoff_base_s: the wait before the first retry; doubles at each further retry …
        backoff_max_s: … up to this.
        jitter: fraction of each wait drawn at random (0 = none, 1 = "full jitter"); spreads many clients'
            retries so that they do not hit a recovering service in lockstep.
        retry_statuses: HTTP statuses retried (503 by default).
        honour_retry_after: wait the server's ``Retry-After`` (capped at ``retry_after_max_s``) when it is
            longer than the backoff.
        retry_read_timeouts: also retry :class:`httpx.ReadTimeout`.
    """

    max_attempts: int = 5
    backoff_base_s: float = 0.25
    backoff_max_s: float = 8.0
    jitter: float = 0.5
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({503}))
    honour_retry_after: bool = True
    retry_after_max_s: float = 60.0
    retry_read_timeouts: bool = False

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be ≥ 1, got {self.max_attempts}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff times must be ≥ 0")
        if any(400 <= s < 500 for s in self.retry_statuses):
            raise ValueError("4xx statuses are never retried: the request itself is wrong")

    @classmethod
    def none(cls) -> RetryPolicy:
        """Send once, never retry."""
        return cls(max_attempts=1)

    def retries_status(self, status: int) -> bool:
        return status in self.retry_statuses

    def retries_exception(self, exc: BaseException) -> bool:
        if isinstance(exc, RETRYABLE_TRANSPORT_ERRORS):
            return True
        return self.retry_read_timeouts and isinstance(exc, httpx.ReadTimeout)

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """The wait before retry number ``retry`` (1 = first retry), jitter applied."""
        base = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** (retry - 1))
        r = (rng or _rng).random()
        return base * (1.0 - self.jitter * r)

    def delay(self, retry: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """The wait before retry ``retry``: the backoff, or the server's ``Retry-After`` when longer."""
        wait = self.backoff(retry, rng)
        if self.honour_retry_after and retry_after is not None:
            wait = max(wait, min(retry_after, self.retry_after_max_s))
        return wait


_rng = random.Random()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds (``"2"``) or an HTTP date; None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
