"""Where profiles live: SQLite (one file, the default) or PostgreSQL (shared by replicas).

Every write is one transaction that takes the profile's write lock before reading it, so the
learner's read-modify-write cannot lose an update to another thread or process, and a process
killed mid-update leaves the previous profile (the database rolls the transaction back). The
store never interprets a profile's ``state``, an event or a response's features: they are JSON
the learner owns.

Connections: each operation borrows one from a small idle pool and gives it back, for both
databases. A connection per thread would tie connections to threads that servers retire
(anyio's worker threads exit when idle), leaking PostgreSQL connections; one connection
behind a lock would make every reader wait behind a writer that SQLite's WAL lets them pass.
Torch-free: the CLI and server import this without loading a model.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from padlm.errors import PadlmError
from padlm.profiles import migrations

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

ATTEMPTS = 8  # tries of one write on lock / serialization errors before giving up
BUSY_TIMEOUT_S = 10.0  # SQLite: how long one BEGIN IMMEDIATE waits for another writer
MAX_IDLE = 8  # connections kept open between operations
ADVISORY_LOCK = 0x7061646C6D  # "padlm": serializes replicas migrating one PostgreSQL database
URL_FORMS = "sqlite:///PATH (sqlite:////absolute/path.db) or postgresql://USER:PASSWORD@HOST:PORT/DB"


@dataclass(frozen=True)
class ProfileRecord:
    """One user's profile. ``created``, ``updated`` and ``version`` are the store's: a change
    may leave them at their defaults, and the store sets them when it writes."""

    tenant: str
    user: str
    state: dict
    choices: int
    text: str | None = None
    created: float = 0.0
    updated: float = 0.0
    version: int = 0


@dataclass(frozen=True)
class ResponseRecord:
    """A response served to a user, remembered until ``expires`` so a later choice among its
    ``index``-ed alternatives can be learned from their features."""

    tenant: str
    user: str
    response_id: str
    index: int
    features: list[float]
    created: float
    expires: float


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``: URLs end up in logs and error messages."""
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        if parts.password is None and all(k != "password" for k, _ in query):
            return url  # rebuilding could change it (urlunsplit drops sqlite:////'s slashes)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, host = netloc.rpartition("@")
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
        query = [(k, "***" if k == "password" else v) for k, v in query]
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))
    except ValueError:
        return f"{url.split(':', 1)[0]}://***"


def _dumps(value: Any) -> str:
    # NaN / Infinity are not JSON, and PostgreSQL's JSONB rejects them: refuse them in both
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


class _Pool:
    """Idle connections; each operation borrows one and gives it back."""

    def __init__(self, connect: Callable[[], Any], usable: Callable[[Any], bool]) -> None:
        self._connect = connect
        self._usable = usable
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def borrow(self) -> Iterator[Any]:
        with self._lock:
            if self._closed:
                raise RuntimeError("the profile store is closed")
            cx = self._idle.pop() if self._idle else None
        if cx is None:
            cx = self._connect()
        try:
            yield cx
        finally:
            keep = self._usable(cx)
            with self._lock:
                if keep and not self._closed and len(self._idle) < MAX_IDLE:
                    self._idle.append(cx)
                    cx = None
            if cx is not None:
                cx.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for cx in idle:
            cx.close()


class ProfileStore:
    """Profiles, the choices learned from, and recent responses; see the module note.

    Subclasses give the dialect (placeholders, JSON, locking); the SQL and the transactions'
    shape are here, once."""

    dialect: str
    lock_clause = ""  # appended to the read that update() writes after

    def __init__(self, url: str, pool: _Pool) -> None:
        self.url = redact(url)
        self._pool = pool
        try:
            self._write(self._migrate)
        except BaseException:
            pool.close()
            raise

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- dialect hooks -------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql

    def _json_param(self, text: str) -> Any:
        return text

    def _json_value(self, value: Any) -> Any:
        return json.loads(value)

    def _retryable(self, exc: BaseException) -> bool:
        raise NotImplementedError

    @contextmanager
    def _transaction(self, cx: Any) -> Iterator[None]:
        raise NotImplementedError
        yield

    def _migrate(self, cx: Any) -> None:
        self._run(cx, migrations.SCHEMA_VERSION_TABLE)
        current = self._run(cx, "SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        for migration in migrations.pending(current[0], self.url):
            for statement in migration.statements(self.dialect):
                self._run(cx, statement)
            self._run(cx, "INSERT INTO schema_version (version, applied) VALUES (?, ?)",
                      (migration.version, time.time()))

    # -- plumbing ------------------------------------------------------------------------

    def _run(self, cx: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return cx.execute(self._sql(sql), params)

    def _read(self, body: Callable[[Any], T]) -> T:
        with self._pool.borrow() as cx:
            return body(cx)

    def _write(self, body: Callable[[Any], T]) -> T:
        """``body`` in one transaction, retried (whole) on lock or serialization errors."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with self._pool.borrow() as cx, self._transaction(cx):
                    return body(cx)
            except Exception as exc:
                if attempt == ATTEMPTS or not self._retryable(exc):
                    raise
            time.sleep(min(0.5, 0.005 * 2**attempt) * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    def _profile(self, row: Sequence[Any] | None) -> ProfileRecord | None:
        if row is None:
            return None
        tenant, user, state, choices, text, created, updated, version = row
        return ProfileRecord(tenant, user, self._json_value(state), choices, text, created,
                             updated, version)

    _PROFILE_COLUMNS = "tenant, user_id, state, choices, text, created, updated, version"

    def _select_profile(self, cx: Any, tenant: str, user: str, lock: str = "") -> Any:
        return self._run(cx, f"SELECT {self._PROFILE_COLUMNS} FROM profiles"
                             f" WHERE tenant = ? AND user_id = ?{lock}", (tenant, user)).fetchone()

    def _append_event(self, cx: Any, record: ProfileRecord, event_json: str) -> None:
        self._run(cx, "INSERT INTO events (tenant, user_id, version, created, event)"
                      " VALUES (?, ?, ?, ?, ?)",
                  (record.tenant, record.user, record.version, record.updated,
                   self._json_param(event_json)))

    # -- the interface -------------------------------------------------------------------

    def get(self, tenant: str, user: str) -> ProfileRecord | None:
        return self._profile(self._read(lambda cx: self._select_profile(cx, tenant, user)))

    def update(self, tenant: str, user: str,
               change: Callable[[ProfileRecord | None], ProfileRecord],
               event: dict | None = None) -> ProfileRecord:
        """Read the profile under its write lock, write ``change(current)`` as the next
        version and append ``event``, all in one transaction; returns what was written.

        ``change`` may be called more than once (after a lock error, or when a concurrent
        first write of this profile wins), each time with the then-current profile, so it
        must only compute its result. If it raises, nothing is written."""
        if event is not None and not isinstance(event, dict):
            raise TypeError(f"an event is a JSON object (dict), not {type(event).__name__}")
        event_json = None if event is None else _dumps(event)

        def body(cx: Any) -> ProfileRecord:
            # a missing row cannot be locked: two first writes may both see None, and the
            # loser's INSERT ... ON CONFLICT DO NOTHING then waits for the winner's commit and
            # inserts nothing; it re-reads (READ COMMITTED sees the winner) and learns on top
            for _ in range(ATTEMPTS):
                current = self._profile(self._select_profile(cx, tenant, user, self.lock_clause))
                proposed = change(current)
                if not isinstance(proposed, ProfileRecord):
                    raise TypeError(f"change returned {type(proposed).__name__}, "
                                    "not a ProfileRecord")
                if (proposed.tenant, proposed.user) != (tenant, user):
                    raise ValueError(f"change returned the profile of {proposed.tenant}/"
                                     f"{proposed.user} for {tenant}/{user}")
                now = time.time()
                record = ProfileRecord(
                    tenant, user, proposed.state, int(proposed.choices), proposed.text,
                    created=now if current is None else current.created, updated=now,
                    version=1 if current is None else current.version + 1)
                values = (self._json_param(_dumps(record.state)), record.choices, record.text,
                          record.created, record.updated, record.version, tenant, user)
                if current is None:
                    written = self._run(
                        cx, "INSERT INTO profiles (state, choices, text, created, updated,"
                            " version, tenant, user_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                            " ON CONFLICT (tenant, user_id) DO NOTHING", values).rowcount
                else:
                    written = self._run(
                        cx, "UPDATE profiles SET state = ?, choices = ?, text = ?, created = ?,"
                            " updated = ?, version = ? WHERE tenant = ? AND user_id = ?",
                        values).rowcount
                if written == 1:
                    if event_json is not None:
                        self._append_event(cx, record, event_json)
                    return record
            raise RuntimeError(f"the profile {tenant}/{user} kept changing under its update")

        return self._write(body)

    def delete(self, tenant: str, user: str) -> bool:
        """Remove the profile, its events and its remembered responses; True if any existed."""
        def body(cx: Any) -> bool:
            # the profile first: its row lock makes a concurrent update finish (events
            # included) before the events are deleted, or start after all of this
            return sum(self._run(cx, f"DELETE FROM {table} WHERE tenant = ? AND user_id = ?",
                                 (tenant, user)).rowcount
                       for table in ("profiles", "events", "responses")) > 0

        return self._write(body)

    def users(self, tenant: str) -> list[str]:
        rows = self._read(lambda cx: self._run(
            cx, "SELECT user_id FROM profiles WHERE tenant = ? ORDER BY user_id",
            (tenant,)).fetchall())
        return [row[0] for row in rows]

    def events(self, tenant: str, user: str) -> list[dict]:
        rows = self._read(lambda cx: self._run(
            cx, "SELECT event FROM events WHERE tenant = ? AND user_id = ? ORDER BY id",
            (tenant, user)).fetchall())
        return [self._json_value(row[0]) for row in rows]

    def remember(self, records: Sequence[ResponseRecord], keep_per_user: int) -> None:
        """Upsert ``records``; then keep only the newest ``keep_per_user`` responses of each
        (tenant, user) they belong to, so memory per user stays bounded."""
        if keep_per_user < 0:
            raise ValueError(f"keep_per_user must be >= 0, got {keep_per_user}")
        rows = [(r.tenant, r.response_id, r.index, r.user,
                 self._json_param(_dumps(list(r.features))), r.created, r.expires)
                for r in records]
        owners = sorted({(r.tenant, r.user) for r in records})
        if not rows:
            return

        def body(cx: Any) -> None:
            cx.cursor().executemany(self._sql(
                "INSERT INTO responses (tenant, response_id, idx, user_id, features, created,"
                " expires) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, response_id, idx)"
                " DO UPDATE SET user_id = excluded.user_id, features = excluded.features,"
                " created = excluded.created, expires = excluded.expires"), rows)
            for tenant, user in owners:
                self._run(cx, "DELETE FROM responses WHERE tenant = ? AND user_id = ?"
                              " AND (response_id, idx) NOT IN (SELECT response_id, idx"
                              " FROM responses WHERE tenant = ? AND user_id = ?"
                              " ORDER BY created DESC, response_id DESC, idx DESC LIMIT ?)",
                          (tenant, user, tenant, user, keep_per_user))

        self._write(body)

    def recall(self, tenant: str, response_id: str, index: int,
               now: float | None = None) -> ResponseRecord | None:
        """The remembered response, or None when unknown, another tenant's, or expired."""
        now = time.time() if now is None else now
        row = self._read(lambda cx: self._run(
            cx, "SELECT tenant, user_id, response_id, idx, features, created, expires"
                " FROM responses WHERE tenant = ? AND response_id = ? AND idx = ?"
                " AND expires >= ?", (tenant, response_id, index, now)).fetchone())
        if row is None:
            return None
        tenant, user, response_id, index, features, created, expires = row
        return ResponseRecord(tenant, user, response_id, index, self._json_value(features),
                              created, expires)

    def prune(self, now: float | None = None) -> int:
        """Delete expired responses; returns how many."""
        now = time.time() if now is None else now
        return self._write(lambda cx: self._run(
            cx, "DELETE FROM responses WHERE expires < ?", (now,)).rowcount)

    def close(self) -> None:
        self._pool.close()


class SqliteStore(ProfileStore):
    """One SQLite file in WAL mode: readers never wait for the writer, and writers (threads
    or processes) queue on BEGIN IMMEDIATE for up to ``BUSY_TIMEOUT_S``."""

    dialect = "sqlite"

    def __init__(self, url: str, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PadlmError(f"cannot create the profile store {redact(url)}: {exc}",
                             param="profiles") from exc
        super().__init__(url, _Pool(self._connect, lambda cx: not cx.in_transaction))

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE), not the module's;
            # check_same_thread=False: a pooled connection serves one thread at a time
            cx = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                 check_same_thread=False)
            cx.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._wal(cx)
        except sqlite3.Error as exc:
            raise PadlmError(f"cannot open the profile store {self.url}: {exc}",
                             param="profiles") from exc
        return cx

    def _wal(self, cx: sqlite3.Connection) -> None:
        """Switch to WAL, retrying while another connection holds the lock: SQLite answers
        a journal-mode change on a file another replica is just creating with SQLITE_BUSY
        at once, without waiting out ``busy_timeout`` (seen as "database is locked" when
        several stores open a new file together)."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                cx.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if not self._retryable(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.01, 0.05))

    def _retryable(self, exc: BaseException) -> bool:
        code = getattr(exc, "sqlite_errorcode", None)
        return (isinstance(exc, sqlite3.OperationalError) and code is not None
                and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED))

    @contextmanager
    def _transaction(self, cx: sqlite3.Connection) -> Iterator[None]:
        # IMMEDIATE takes the write lock before the first read, so the row update() reads
        # is the one it overwrites (a DEFERRED read could go stale before its write)
        cx.execute("BEGIN IMMEDIATE")
        try:
            yield
            cx.execute("COMMIT")
        except BaseException:
            if cx.in_transaction:
                cx.execute("ROLLBACK")
            raise


class PostgresStore(ProfileStore):
    """PostgreSQL through psycopg 3, READ COMMITTED: update() locks the profile's row with
    SELECT ... FOR UPDATE, and a first write goes through INSERT ... ON CONFLICT."""

    dialect = "postgres"
    lock_clause = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        # imported here: SQLite users (and the vLLM environment, which pins its own
        # dependencies) need no psycopg
        import psycopg
        import psycopg.errors
        from psycopg.types.json import Jsonb

        self._psycopg, self._jsonb = psycopg, Jsonb
        self._dsn = url
        super().__init__(url, _Pool(self._connect, self._usable))

    def _connect(self) -> psycopg.Connection:
        psycopg = self._psycopg
        options: dict[str, Any] = {"autocommit": True}  # transactions are ours (transaction())
        try:
            if "connect_timeout" not in psycopg.conninfo.conninfo_to_dict(self._dsn):
                options["connect_timeout"] = 10  # libpq would wait forever on a dead host
            return psycopg.connect(self._dsn, **options)
        except psycopg.Error as exc:
            raise PadlmError(f"cannot connect to the profile store {self.url}: {exc}",
                             param="profiles") from exc

    def _usable(self, cx: psycopg.Connection) -> bool:
        return (not cx.closed and not cx.broken
                and cx.info.transaction_status == self._psycopg.pq.TransactionStatus.IDLE)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")  # no literal '?' in this module's SQL

    def _json_param(self, text: str) -> Any:
        return self._jsonb(text, dumps=lambda already_json: already_json)

    def _json_value(self, value: Any) -> Any:
        return value  # psycopg has parsed JSONB already

    def _retryable(self, exc: BaseException) -> bool:
        errors = self._psycopg.errors
        return isinstance(exc, (errors.SerializationFailure, errors.DeadlockDetected,
                                errors.LockNotAvailable))

    @contextmanager
    def _transaction(self, cx: psycopg.Connection) -> Iterator[None]:
        with cx.transaction():
            yield

    def _migrate(self, cx: Any) -> None:
        # replicas starting at once would race on CREATE TABLE; this waits for the other
        self._run(cx, "SELECT pg_advisory_xact_lock(?)", (ADVISORY_LOCK,))
        super()._migrate(cx)


def open_store(url: str) -> ProfileStore:
    """Open (creating or migrating) the store at ``url``: ``sqlite:///PATH`` (relative;
    ``sqlite:////abs/path.db`` absolute, as SQLAlchemy reads them) or ``postgresql://...``."""
    if url.startswith("sqlite:///") and url[len("sqlite:///"):] not in ("", ":memory:"):
        return SqliteStore(url, Path(url[len("sqlite:///"):]))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresStore(url)
    raise PadlmError(f"unknown profile store URL {redact(url)!r}: use {URL_FORMS}",
                     param="profiles")


def default_store_url() -> str:
    """SQLite in ``$PADLM_HOME/profiles.db``.

    padlm_home lives in padlm.core.models, which imports torch: imported here, on call, so
    that importing the store stays torch-free."""
    from padlm.core.models import padlm_home

    return f"sqlite:///{(padlm_home() / 'profiles.db').absolute()}"
