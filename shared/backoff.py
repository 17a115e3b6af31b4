"""How long to wait before trying again: exponential backoff with jitter.

One helper for every retry loop: the bus reconnecting to the broker, the archiver
retrying the database, the collector re-probing an offline meter, the actuator
retrying a coil write. Attempt 0 waits about ``initial_s``; each failure multiplies
the wait by ``factor`` up to ``max_s``; the wait is drawn from the top ``jitter``
share of that ceiling, so that many clients that failed together do not all retry
at the same instant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Waits of ``initial_s * factor**attempt`` (at most ``max_s``), less up to ``jitter``.

    ``Backoff()`` waits in [d/2, d]; ``jitter=0`` always waits the ceiling exactly.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    #: the share of the ceiling the jitter may take off: a wait is in [d * (1 - jitter), d]
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not self.initial_s > 0:
            raise ValueError(f"Backoff: initial_s must be > 0, not {self.initial_s}")
        if not self.max_s >= self.initial_s:
            raise ValueError(
                f"Backoff: max_s ({self.max_s}) must be at least initial_s ({self.initial_s})"
            )
        if not self.factor >= 1:
            raise ValueError(f"Backoff: factor must be >= 1, not {self.factor}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"Backoff: jitter must be in [0, 1], not {self.jitter}")

    def ceiling(self, attempt: int) -> float:
        """The longest wait after ``attempt`` earlier failures (0 = the first retry)."""
        try:
            wait = self.initial_s * self.factor ** max(attempt, 0)
        except OverflowError:  # an outage of thousands of attempts: long since at max_s
            return self.max_s
        return min(self.max_s, wait)

    def delay(self, attempt: int) -> float:
        """A wait in [ceiling * (1 - jitter), ceiling] for this attempt."""
        return self.ceiling(attempt) * random.uniform(1.0 - self.jitter, 1.0)
