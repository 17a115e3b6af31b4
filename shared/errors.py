"""pfmon's exceptions: one root, split by who is at fault.

* :class:`PeerError` - a device or server refused or failed (carries the Modbus
  exception code when there is one).
* :class:`ConfigError` - the caller or a configuration file is wrong.
* :class:`InternalError` - a bug in pfmon.

Library errors are converted where they enter our code (``raise ... from exc``).
"""

from __future__ import annotations


class PfmError(Exception):
    """Root of every error pfmon raises on purpose."""


class PeerError(PfmError):
    """A device, broker or database refused the request or did not answer."""

    def __init__(self, message: str, *, code: int | None = None, kind: str = "error") -> None:
        super().__init__(message)
        #: Modbus exception code (0x01..0x0B) when the peer answered with one.
        self.code = code
        #: short classification used as a metric label (``timeout``, ``exception_02`` ...).
        self.kind = kind


class ConfigError(PfmError):
    """Configuration or caller input is invalid. ``problems`` lists every bad field."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = problems or []

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class InternalError(PfmError):
    """Something that should not happen: a bug in pfmon."""
