"""SQLite store: WAL, synchronous=NORMAL, versioned schema applied once."""

import os
import stat

from certrotate_server.store import MIGRATIONS, Store


def test_schema_versioned_and_pragmas(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    assert stat.S_IMODE(os.stat(tmp_path / "db.sqlite").st_mode) == 0o600
    assert store.schema_version() == MIGRATIONS[-1][0]
    with store.connection() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    with store.transaction() as conn:
        conn.execute("INSERT INTO devices (name, pubkey, created_at) VALUES ('d', 'k', 'now')")
    store.close()
    again = Store(tmp_path / "db.sqlite")  # reopening applies nothing twice and keeps the data
    assert again.query_one("SELECT COUNT(*) FROM schema_migrations")[0] == len(MIGRATIONS)
    assert again.query_one("SELECT name FROM devices")[0] == "d"


def test_failed_transaction_rolls_back(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    try:
        with store.transaction() as conn:
            conn.execute("INSERT INTO devices (name, pubkey, created_at) VALUES ('d', 'k', 'now')")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert store.query_one("SELECT COUNT(*) FROM devices")[0] == 0
