"""SQLite storage: WAL, versioned schema, one connection per thread.

Durability: WAL with synchronous=NORMAL keeps every committed transaction
across a SIGKILL of the process (the WAL is in the OS page cache); it may
lose the last transactions on power loss, which this reference backend accepts.
Callers acknowledge a write to a client only after `transaction()` returned.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
import queue
import threading
import time
from pathlib import Path

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE devices (
            name TEXT PRIMARY KEY,
            pubkey TEXT NOT NULL,
            next_pubkey TEXT,
            group_name TEXT,
            created_at TEXT NOT NULL,
            pubkey_changed_at TEXT
        );
        CREATE TABLE certificates (
            fingerprint TEXT PRIMARY KEY,
            serial TEXT NOT NULL,
            device TEXT NOT NULL,
            pubkey TEXT NOT NULL,
            not_after TEXT NOT NULL,
            issued_at TEXT NOT NULL,
            issued_by TEXT NOT NULL
        );
        CREATE INDEX certificates_device ON certificates(device);
        CREATE TABLE deny_list (
            fingerprint TEXT PRIMARY KEY,
            serial TEXT NOT NULL,
            device TEXT NOT NULL,
            reason TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE TABLE config_files (
            scope TEXT NOT NULL CHECK (scope IN ('factory', 'group', 'device')),
            owner TEXT NOT NULL,
            name TEXT NOT NULL,
            value TEXT NOT NULL,
            unencrypted INTEGER NOT NULL,
            on_changed TEXT NOT NULL,
            reason TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (scope, owner, name)
        );
        CREATE TABLE device_events (
            device TEXT NOT NULL,
            id TEXT NOT NULL,
            correlation_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            event_version INTEGER NOT NULL,
            device_time TEXT NOT NULL,
            success INTEGER,
            target_name TEXT NOT NULL,
            version TEXT NOT NULL,
            details TEXT NOT NULL,
            received_at TEXT NOT NULL,
            PRIMARY KEY (device, id)
        );
        CREATE INDEX device_events_update ON device_events(device, correlation_id);
        CREATE TABLE factory_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            type TEXT NOT NULL,
            device TEXT NOT NULL,
            payload TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE TABLE enrollment_requests (
            pubkey TEXT PRIMARY KEY,
            subject TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'approved')),
            created_at TEXT NOT NULL
        );
        """,
    ),
    (
        2,
        # When each scope's config files last changed (sub-second, server
        # clock): GET /config answers 304 against it. Seeded from updated_at,
        # which has whole seconds, so one second later than the true change.
        """
        CREATE TABLE config_changes (
            scope TEXT NOT NULL,
            owner TEXT NOT NULL,
            changed_at REAL NOT NULL,
            PRIMARY KEY (scope, owner)
        );
        INSERT INTO config_changes
            SELECT scope, owner, MAX((julianday(updated_at) - 2440587.5) * 86400.0) + 1.0
            FROM config_files GROUP BY scope, owner
        """,
    ),
    (
        3,
        # The issuing CA's Subject (RFC 4514): `ca retire-old` finds the devices
        # that hold no certificate of the new device CA. NULL: issued before this
        # version, so before any rollover (by the first device CA).
        "ALTER TABLE certificates ADD COLUMN issuer TEXT",
    ),
]


def utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Store:
    """A pool of connections: request threads are short-lived, so a connection
    per thread would be opened (and its pragmas run) on every request."""

    # Thousands of request threads share this many connections (file descriptors,
    # page caches); the others wait their turn, which is short.
    MAX_CONNECTIONS = 32

    def __init__(self, path: Path):
        self.path = Path(path)
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)
        # Config files may hold secrets: owner-only (SQLite gives -wal/-shm the same mode).
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self.migrate()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextlib.contextmanager
    def connection(self):
        with self._slots:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._open()
            try:
                yield conn
            finally:
                if conn.in_transaction:  # never hand on a connection mid-transaction
                    conn.close()
                else:
                    self._idle.put(conn)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    @contextlib.contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT: a writer waits for the lock up front (no upgrade deadlock)."""
        with self.connection() as conn:
            for attempt in range(50):
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as err:
                    if "locked" not in str(err) or attempt == 49:
                        raise
                    time.sleep(0.01 * (attempt + 1))
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def query(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self.connection() as conn:
            return conn.execute(sql, args).fetchall()

    def query_one(self, sql: str, args=()) -> sqlite3.Row | None:
        with self.connection() as conn:
            return conn.execute(sql, args).fetchone()

    def migrate(self) -> None:
        with self.transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, sql in MIGRATIONS:
                if version in done:
                    continue
                for statement in sql.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, utcnow()))

    def schema_version(self) -> int:
        row = self.query_one("SELECT MAX(version) FROM schema_migrations")
        return row[0] or 0

    # Factory events ------------------------------------------------------
    @staticmethod
    def add_factory_event(conn, type_: str, device: str, payload: dict) -> None:
        conn.execute(
            "INSERT INTO factory_events (type, device, payload, created_at) VALUES (?, ?, ?, ?)",
            (type_, device, json.dumps(payload, sort_keys=True), utcnow()),
        )
