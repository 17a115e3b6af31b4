"""A bounded, ordered, on-disk FIFO of (topic, payload) records.

Used when a peer is down (the collector while the broker is unreachable, the
archiver while the database is): records survive a restart, drain in the order
they were written, and when the spool is full the *oldest* are dropped and
counted - never silently. SQLite (stdlib) in WAL mode gives crash safety.

One process owns a spool: ``<file>.lock`` beside it is held with an exclusive
``flock`` (and says the owner's pid) while the spool is open, so a second process
on the same data folder fails at start with :class:`SpoolLocked` instead of
draining the same records and repeating sequence numbers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError


class SpoolLocked(ConfigError):
    """Another process has this spool open."""


def _lock(path: Path) -> int:
    """Hold ``<path>.lock`` exclusively (the file descriptor); raises :class:`SpoolLocked`."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"spool lock {lock_path}: cannot open: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f"pid {holder}" if holder.isdigit() else "a process whose pid it does not say"
        raise SpoolLocked(
            f"spool {path} is in use by another process ({who}, lock {lock_path}): "
            "two services with one data folder and site would send the same records; "
            "stop the other one or give this one its own PFM_DATA_DIR"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    id: int
    topic: str
    payload: bytes


class Spool:
    """``Spool(path, max_records)``; thread-safe; calls are short and synchronous."""

    def __init__(self, path: Path | str, max_records: int = 1_000_000) -> None:
        if max_records < 1:
            raise ValueError("max_records must be at least 1")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_records = max_records
        self._lock = threading.Lock()
        self._lock_fd: int | None = _lock(self.path)
        try:
            self._db = self._open()
        except BaseException:
            self._unlock()
            raise
        self._count = int(self._db.execute("SELECT count(*) FROM spool").fetchone()[0])

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS spool ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL)"
        )
        db.execute("CREATE TABLE IF NOT EXISTS stats (k TEXT PRIMARY KEY, v INTEGER)")
        return db

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the flock

    def __len__(self) -> int:
        return self._count

    @property
    def dropped(self) -> int:
        """Records dropped because the spool was full, over its whole life."""
        row = self._db.execute("SELECT v FROM stats WHERE k='dropped'").fetchone()
        return int(row[0]) if row else 0

    def put(self, topic: str, payload: bytes) -> int:
        """Append one record; returns how many old records were dropped to make room."""
        return self.put_many([(topic, payload)])

    def put_many(self, records: Iterable[tuple[str, bytes]]) -> int:
        rows = list(records)
        if not rows:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO spool(topic, payload) VALUES (?, ?)", rows)
                self._count += len(rows)
                overflow = self._count - self.max_records
                if overflow > 0:
                    self._db.execute(
                        "DELETE FROM spool WHERE id IN (SELECT id FROM spool ORDER BY id LIMIT ?)",
                        (overflow,),
                    )
                    self._db.execute(
                        "INSERT INTO stats(k, v) VALUES ('dropped', ?) "
                        "ON CONFLICT(k) DO UPDATE SET v = v + excluded.v",
                        (overflow,),
                    )
                    self._count = self.max_records
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return max(0, overflow)

    def peek(self, limit: int = 100) -> list[SpoolRecord]:
        """The oldest ``limit`` records, without removing them."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload FROM spool ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [SpoolRecord(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def remove_through(self, record_id: int) -> None:
        """Remove every record up to and including ``record_id`` (after it is delivered)."""
        with self._lock:
            cur = self._db.execute("DELETE FROM spool WHERE id <= ?", (record_id,))
            self._count = max(0, self._count - cur.rowcount)

    def remove(self, record_ids: Iterable[int]) -> None:
        """Remove the given records (delivered out of a batch whose others failed)."""
        ids = [(i,) for i in record_ids]
        if not ids:
            return
        with self._lock:
            before = self._db.total_changes
            self._db.executemany("DELETE FROM spool WHERE id = ?", ids)
            self._count = max(0, self._count - (self._db.total_changes - before))

    def get_meta(self, key: str) -> int | None:
        """A small integer kept beside the records (e.g. the last seq of a meter)."""
        with self._lock:
            row = self._db.execute("SELECT v FROM stats WHERE k = ?", (f"meta:{key}",)).fetchone()
        return int(row[0]) if row else None

    def set_meta(self, values: dict[str, int]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT INTO stats(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
                [(f"meta:{k}", v) for k, v in values.items()],
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._unlock()
