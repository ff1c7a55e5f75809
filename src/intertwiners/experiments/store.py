"""The results store: one SQLite file, ``DIR/results.sqlite``, written by the driver only.

Every unit of work is a *job* whose id is a hash of its full canonical JSON configuration (kind, config,
the ids of the jobs it depends on, and the schema version). Each finished attempt is written in exactly
one transaction, so a process killed at any moment leaves either the whole row or nothing, and the
primary key on the id makes duplicates impossible.

Table ``jobs``: ``id, kind, label, config, deps, status ('done' | 'failed'), result (JSON), error,
attempts, started_at, finished_at, wall_s, artifact, worker``. Table ``runs``: one row per invocation
of the runner (start/end times and counts). The database uses SQLite's default rollback journal (not WAL)
so that the single file is complete on its own: the report can be redrawn from it alone.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bump when the meaning of a job configuration or of a stored result changes: every job id changes with it.
SCHEMA_VERSION = 1

STORE_NAME = "results.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    label       TEXT NOT NULL,
    config      TEXT NOT NULL,
    deps        TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    result      TEXT,
    error       TEXT,
    attempts    INTEGER NOT NULL,
    started_at  REAL,
    finished_at REAL,
    wall_s      REAL,
    artifact    TEXT,
    worker      TEXT
);
CREATE INDEX IF NOT EXISTS jobs_kind ON jobs (kind);
CREATE TABLE IF NOT EXISTS runs (
    run_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at  REAL NOT NULL,
    finished_at REAL,
    plan        TEXT NOT NULL,
    backend     TEXT NOT NULL,
    planned     INTEGER NOT NULL,
    skipped     INTEGER NOT NULL,
    executed    INTEGER,
    succeeded   INTEGER,
    failed      INTEGER,
    blocked     INTEGER
);
"""


def canonical_json(obj: Any) -> str:
    """Deterministic JSON text: sorted keys, no spaces, no NaN/Infinity (a ValueError names the problem)."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as err:
        raise ValueError(f"not storable as JSON (NaN or Infinity?): {err}") from err
    except TypeError as err:
        raise ValueError(f"not storable as JSON: {err}") from err


def job_id(kind: str, config: dict, deps: dict[str, str] | None = None, code: str | None = None) -> str:
    """Hash (sha256, 20 hex digits) of the canonical JSON of ``kind``, ``config``, ``deps``, the schema version
    and ``code`` (a hash of the source of the code that runs the job; see ``JobType.code_version``)."""
    text = canonical_json({"kind": kind, "config": config, "deps": dict(deps or {}), "schema": SCHEMA_VERSION,
                           "code": code})
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class JobRow:
    """One row of the ``jobs`` table, decoded."""

    id: str
    kind: str
    label: str
    config: dict
    deps: dict
    status: str
    result: dict | None
    error: str | None
    attempts: int
    started_at: float | None
    finished_at: float | None
    wall_s: float | None
    artifact: str | None
    worker: str | None


class ResultsStore:
    """The SQLite results store of one output folder (``DIR/results.sqlite``).

    Only the driver process opens it for writing. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False):
        path = Path(path)
        if path.is_dir() or path.suffix != ".sqlite":
            path = path / STORE_NAME
        self.path = path
        self._conn = None
        if readonly and not path.is_file():
            raise ValueError(f"no results database at {path}")
        if path.exists() and not path.is_file():
            raise ValueError(f"{path} exists and is not a file")
        try:
            self._open(path, readonly)
        except sqlite3.DatabaseError as err:
            self.close()
            raise ValueError(f"{path} is not a readable results database ({err}); it is damaged or not a "
                             "database: move it away (the artifacts folder can stay) or use another --out") from err
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path, readonly: bool) -> None:
        if not readonly:
            path.parent.mkdir(parents=True, exist_ok=True)
        # opened read-write even when readonly=True so that SQLite can roll back a hot journal left by a
        # killed driver; nothing is written through a store opened with readonly=True
        self._conn = sqlite3.connect(path, timeout=30)
        if path.stat().st_size > 0:
            # a garbage or truncated file is refused before anything is written to it
            problems = [r[0] for r in self._conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(map(str, problems)))
        existing = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if existing - {"sqlite_sequence"} and not {"meta", "jobs", "runs"} <= existing:
            raise ValueError(f"{path} is an SQLite database but not an intertwiners results store (tables: "
                             f"{sorted(existing)}); it is left untouched: use another --out")
        if not readonly:
            self._conn.execute("PRAGMA journal_mode=DELETE")
            self._conn.execute("PRAGMA synchronous=FULL")
            with self._conn:
                self._conn.executescript(_SCHEMA)
                found = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if found is None:
                    self._conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                columns = {r[1] for r in self._conn.execute("PRAGMA table_info(jobs)")}
                if "manifest" not in columns:   # added after schema 1 was released: a compatible addition
                    self._conn.execute("ALTER TABLE jobs ADD COLUMN manifest TEXT")
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"meta", "jobs", "runs"} <= tables:
            raise ValueError(f"{path} is an SQLite database but not an intertwiners results store (tables: "
                             f"{sorted(tables)}); use another --out")
        version = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if version is None or str(version[0]) != str(SCHEMA_VERSION):
            found = None if version is None else version[0]
            raise ValueError(f"{path} has schema version {found}, this code writes {SCHEMA_VERSION}; "
                             "use a new output folder")
        self._has_manifest = "manifest" in {r[1] for r in self._conn.execute("PRAGMA table_info(jobs)")}

    # -- context manager ------------------------------------------------------------------------------
    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing (driver only; one transaction each) ----------------------------------------------------
    def record(self, *, id: str, kind: str, label: str, config: dict, deps: dict[str, str], status: str,
               result: dict | None = None, error: str | None = None, started_at: float | None = None,
               finished_at: float | None = None, wall_s: float | None = None, artifact: str | None = None,
               worker: str | None = None, manifest: dict[str, int] | None = None) -> None:
        """Insert or update the row of job ``id`` in one transaction; ``attempts`` is incremented.

        ``manifest``: ``{file name: size in bytes}`` of the job's artifact folder, checked file by file before
        the job counts as done (:meth:`artifact_complete`).
        """
        if status not in ("done", "failed"):
            raise ValueError(f"status must be 'done' or 'failed', got {status!r}")
        result_text = None if result is None else canonical_json(result)
        with self._conn:
            row = self._conn.execute("SELECT attempts FROM jobs WHERE id=?", (id,)).fetchone()
            attempts = (row[0] if row else 0) + 1
            self._conn.execute(
                "INSERT OR REPLACE INTO jobs (id, kind, label, config, deps, status, result, error, attempts, "
                "started_at, finished_at, wall_s, artifact, worker, manifest) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (id, kind, label, canonical_json(config), canonical_json(deps), status, result_text, error,
                 attempts, started_at, finished_at, wall_s, artifact, worker,
                 None if manifest is None else canonical_json(manifest)))

    def start_run(self, plan: dict, backend: str, planned: int, skipped: int) -> int:
        with self._conn:
            cur = self._conn.execute(
                "INSERT INTO runs (started_at, plan, backend, planned, skipped) VALUES (?,?,?,?,?)",
                (time.time(), canonical_json(plan), backend, planned, skipped))
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, executed: int, succeeded: int, failed: int, blocked: int) -> None:
        with self._conn:
            self._conn.execute(
                "UPDATE runs SET finished_at=?, executed=?, succeeded=?, failed=?, blocked=? WHERE run_id=?",
                (time.time(), executed, succeeded, failed, blocked, run_id))

    def set_meta(self, key: str, value: Any) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, canonical_json(value)))

    # -- reading --------------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else _json(row[0], f"{self.path}: meta {key!r}")

    def manifest(self, id: str) -> dict[str, int] | None:
        """``{file name: size}`` recorded with the artifact of job ``id`` (None for rows written before manifests
        existed, or without an artifact)."""
        if not self._has_manifest:
            return None
        row = self._conn.execute("SELECT manifest FROM jobs WHERE id=?", (id,)).fetchone()
        return None if row is None or row[0] is None else _json(row[0], f"{self.path}: manifest of job {id}")

    def get(self, id: str) -> JobRow | None:
        row = self._conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (id,)).fetchone()
        return None if row is None else _decode(row)

    def rows(self, kind: str | None = None, status: str | None = None) -> list[JobRow]:
        """Rows (optionally of one ``kind`` and/or ``status``), ordered by label then id."""
        query, args = f"SELECT {_COLUMNS} FROM jobs", []
        where = []
        if kind is not None:
            where.append("kind=?")
            args.append(kind)
        if status is not None:
            where.append("status=?")
            args.append(status)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY label, id"
        return [_decode(r) for r in self._conn.execute(query, args)]

    def statuses(self) -> dict[str, str]:
        """``{job id: status}`` for every row."""
        return dict(self._conn.execute("SELECT id, status FROM jobs"))

    def runs(self) -> list[dict]:
        cur = self._conn.execute("SELECT * FROM runs ORDER BY run_id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur]

    def count(self, status: str | None = None) -> int:
        if status is None:
            return self._conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        return self._conn.execute("SELECT COUNT(*) FROM jobs WHERE status=?", (status,)).fetchone()[0]

    def __iter__(self) -> Iterator[JobRow]:
        return iter(self.rows())


_COLUMNS = ("id, kind, label, config, deps, status, result, error, attempts, started_at, finished_at, wall_s, "
            "artifact, worker")


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is damaged ({err}); the results database was changed by hand or is corrupt") from err


def _decode(row: tuple) -> JobRow:
    (id_, kind, label, config, deps, status, result, error, attempts, started, finished, wall, artifact,
     worker) = row
    what = f"results database row of job {id_}"
    return JobRow(id_, kind, label, _json(config, what), _json(deps, what), status,
                  None if result is None else _json(result, what), error, attempts, started, finished, wall,
                  artifact, worker)
