"""The profile store against both databases: SQLite in tmp_path, and PostgreSQL at
$PADLM_TEST_POSTGRES_URL (CI starts one with scripts/start-postgres.sh), each test in a fresh
database of its own. The concurrency tests use real processes (spawned), since the store's
promise is that two server replicas, or a CLI beside a server, lose no update."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from padlm.errors import PadlmError
from padlm.profiles import migrations
from padlm.profiles.store import (
    PostgresStore,
    ProfileRecord,
    ProfileStore,
    ResponseRecord,
    SqliteStore,
    default_store_url,
    open_store,
)

POSTGRES_URL = os.environ.get("PADLM_TEST_POSTGRES_URL")
SPAWN = multiprocessing.get_context("spawn")  # no forked copies of the parent's connections


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'profiles.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("PADLM_TEST_POSTGRES_URL is unset; `bash scripts/start-postgres.sh` "
                    "starts a local PostgreSQL and prints one")
    name = f"padlm_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                          .format(sql.Identifier(name)))


@pytest.fixture
def store(store_url: str) -> Iterator[ProfileStore]:
    opened = open_store(store_url)
    yield opened
    opened.close()


def raw(url: str, statement: str) -> list[tuple]:
    """Run SQL beside the store, as another program (or an operator) would."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///"):]) as cx:
            return cx.execute(statement).fetchall()
    with psycopg.connect(url, autocommit=True) as cx:
        cursor = cx.execute(statement)
        return cursor.fetchall() if cursor.description else []


def increment(current: ProfileRecord | None) -> ProfileRecord:
    base = current or ProfileRecord("t", "u", {"count": 0}, 0)
    return replace(base, state={"count": base.state["count"] + 1}, choices=base.choices + 1)


def hammer(url: str, start: object, times: int) -> None:
    store = open_store(url)
    start.wait(60)
    for i in range(times):
        store.update("t", "u", increment, event={"pid": os.getpid(), "i": i})
    store.close()


def die_in_update(url: str, where: str) -> None:
    store = open_store(url)
    if where == "change":
        store.update("t", "u", lambda current: os._exit(3), event={"doomed": True})
    else:  # after the profile's UPDATE, before its event: only the transaction can undo it
        store._append_event = lambda *args: os._exit(3)
        store.update("t", "u", increment, event={"doomed": True})


def test_round_trip_versions_and_created(store: ProfileStore) -> None:
    assert store.get("t", "u") is None
    state = {"mean": [0.25, -1.5, 1e-300], "nested": {"ü": "ẞ"}, "ok": True, "none": None}
    first = store.update("t", "u", lambda cur: ProfileRecord("t", "u", state, 1, "likes haiku"),
                         event={"chosen": 0, "features": [[0.1, 0.2], [0.3, 0.4]]})
    assert first.version == 1 and first.created == first.updated
    assert store.get("t", "u") == first
    assert store.get("t", "u").state == state
    time.sleep(0.01)
    second = store.update("t", "u", lambda cur: replace(cur, choices=2, text=None),
                          event={"chosen": 1})
    assert second.version == 2 and second.created == first.created
    assert second.updated > first.updated and second.text is None and second.state == state
    assert store.get("t", "u") == second
    assert store.update("t", "u", lambda cur: cur).version == 3  # no event: none appended
    assert store.events("t", "u") == [
        {"chosen": 0, "features": [[0.1, 0.2], [0.3, 0.4]]}, {"chosen": 1}]
    assert store.get("t", "other") is None and store.get("other", "u") is None


def test_tenants_and_users(store: ProfileStore) -> None:
    for tenant, user in [("a", "zed"), ("a", "amy"), ("b", "amy")]:
        store.update(tenant, user, lambda cur, t=tenant, u=user: ProfileRecord(t, u, {}, 0),
                     event={"who": f"{tenant}/{user}"})
    assert store.users("a") == ["amy", "zed"] and store.users("b") == ["amy"]
    assert store.users("nobody") == []
    assert store.events("b", "amy") == [{"who": "b/amy"}]


def test_change_that_raises_writes_nothing(store: ProfileStore) -> None:
    before = store.update("t", "u", increment, event={"n": 1})

    def broken(current: ProfileRecord | None) -> ProfileRecord:
        raise KeyError("learner bug")

    with pytest.raises(KeyError, match="learner bug"):
        store.update("t", "u", broken, event={"n": 2})
    with pytest.raises(ValueError, match="profile of t/someone-else"):
        store.update("t", "u", lambda cur: replace(cur, user="someone-else"), event={"n": 3})
    with pytest.raises(ValueError):  # NaN is not JSON (and PostgreSQL's JSONB refuses it)
        store.update("t", "u", lambda cur: replace(cur, state={"x": float("nan")}))
    with pytest.raises(TypeError):
        store.update("t", "u", increment, event=["not", "an", "object"])
    assert store.get("t", "u") == before
    assert store.events("t", "u") == [{"n": 1}]
    assert store.update("t", "u", increment).version == 2  # and the store is still usable


@pytest.mark.parametrize("where", ["change", "write"])
def test_process_killed_mid_update_loses_nothing(store: ProfileStore, store_url: str,
                                                 where: str) -> None:
    before = store.update("t", "u", increment, event={"n": 1})
    child = SPAWN.Process(target=die_in_update, args=(store_url, where))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    assert store.get("t", "u") == before
    assert store.events("t", "u") == [{"n": 1}]
    started = time.monotonic()
    after = store.update("t", "u", increment, event={"n": 2})  # the dead writer's lock is gone
    assert time.monotonic() - started < 5
    assert (after.version, after.state) == (2, {"count": 2})
    assert store.events("t", "u") == [{"n": 1}, {"n": 2}]


def test_two_processes_lose_no_update(store: ProfileStore, store_url: str) -> None:
    start = SPAWN.Event()
    children = [SPAWN.Process(target=hammer, args=(store_url, start, 50)) for _ in range(2)]
    for child in children:
        child.start()
    start.set()  # both begin on a missing profile: the first write races too
    for child in children:
        child.join(120)
        assert child.exitcode == 0
    record = store.get("t", "u")
    assert (record.state, record.choices, record.version) == ({"count": 100}, 100, 100)
    events = store.events("t", "u")
    assert len(events) == 100
    for pid in {event["pid"] for event in events}:  # each process's events in its own order
        assert [e["i"] for e in events if e["pid"] == pid] == list(range(50))


def test_threads_lose_no_update(store: ProfileStore) -> None:
    def work() -> None:
        for _ in range(25):
            store.update("t", "u", increment, event={})

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert store.get("t", "u").state == {"count": 100}
    assert len(store.events("t", "u")) == 100


def test_concurrent_first_write_is_not_lost(store: ProfileStore) -> None:
    """Two first writes that both read "no profile": PostgreSQL has no row to lock, so the
    loser's INSERT ... ON CONFLICT must re-read and learn on top of the winner's."""
    both_read_none = threading.Barrier(2)
    seen: list[int] = []

    def change(current: ProfileRecord | None) -> ProfileRecord:
        seen.append(0 if current is None else current.version)
        if current is None:
            # SQLite's BEGIN IMMEDIATE lets only one in: that one waits out the timeout
            with contextlib.suppress(threading.BrokenBarrierError):
                both_read_none.wait(timeout=1)
        return increment(current)

    threads = [threading.Thread(target=store.update, args=("t", "u", change, {})) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    record = store.get("t", "u")
    assert (record.version, record.state) == (2, {"count": 2})
    assert len(store.events("t", "u")) == 2
    if isinstance(store, PostgresStore):
        assert sorted(seen) == [0, 0, 1]  # both read None; the loser re-read the winner's


def response(user: str, rid: str, index: int = 0, created: float = 100.0,
             expires: float = 1000.0, tenant: str = "t") -> ResponseRecord:
    return ResponseRecord(tenant, user, rid, index, [0.5, -1.0, float(index)], created, expires)


def test_delete_removes_profile_events_and_responses(store: ProfileStore) -> None:
    store.update("t", "u", increment, event={"n": 1})
    store.update("t", "v", lambda cur: ProfileRecord("t", "v", {}, 0), event={"n": 1})
    store.remember([response("u", "r1"), response("v", "r2")], keep_per_user=10)
    assert store.delete("t", "u") is True
    assert store.get("t", "u") is None and store.events("t", "u") == []
    assert store.recall("t", "r1", 0, now=0) is None
    assert store.users("t") == ["v"]  # the neighbour keeps everything
    assert store.events("t", "v") == [{"n": 1}] and store.recall("t", "r2", 0, now=0)
    assert store.delete("t", "u") is False
    store.remember([response("w", "r3")], keep_per_user=10)  # responses alone count too
    assert store.delete("t", "w") is True


def test_recall(store: ProfileStore) -> None:
    store.remember([response("u", "chatcmpl-1", 0), response("u", "chatcmpl-1", 1)],
                   keep_per_user=10)
    got = store.recall("t", "chatcmpl-1", 1, now=500)
    assert got == response("u", "chatcmpl-1", 1)
    assert store.recall("t", "chatcmpl-1", 2, now=500) is None  # unknown index
    assert store.recall("t", "chatcmpl-2", 0, now=500) is None  # unknown id
    assert store.recall("other", "chatcmpl-1", 0, now=500) is None  # another tenant's
    assert store.recall("t", "chatcmpl-1", 0, now=1000) is not None  # expires is inclusive
    assert store.recall("t", "chatcmpl-1", 0, now=1000.5) is None  # expired
    assert store.recall("t", "chatcmpl-1", 0) is None  # now defaults to the clock


def test_remember_upserts_and_keeps_the_newest(store: ProfileStore) -> None:
    store.remember([response("u", f"r{i}", created=float(i)) for i in range(5)], keep_per_user=3)
    assert [store.recall("t", f"r{i}", 0, now=0) is not None for i in range(5)] == [
        False, False, True, True, True]
    store.remember([response("u", "r2", created=50.0, expires=2000.0)], keep_per_user=3)
    assert store.recall("t", "r2", 0, now=1500).expires == 2000.0  # upserted in place
    store.remember([response("v", "x", created=1.0, tenant="t"),
                    response("u", "r9", created=9.0, tenant="other")], keep_per_user=1)
    assert store.recall("t", "r2", 0, now=0) is not None  # (t, u) was not touched
    store.remember([response("u", "r10", created=10.0)], keep_per_user=1)
    assert [rid for rid in ["r2", "r3", "r4", "r10"]
            if store.recall("t", rid, 0, now=0)] == ["r2"]  # newest by created: r2 (50.0)
    store.remember([], keep_per_user=1)
    with pytest.raises(ValueError):
        store.remember([response("u", "r11")], keep_per_user=-1)


def test_prune(store: ProfileStore) -> None:
    store.remember([response("u", f"r{i}", expires=float(i)) for i in range(5)], keep_per_user=9)
    assert store.prune(now=2.5) == 3
    assert store.prune(now=2.5) == 0
    assert [store.recall("t", f"r{i}", 0, now=0) is not None for i in range(5)] == [
        False, False, False, True, True]
    assert store.prune() == 2  # the clock is long past 4.0


def test_migrations_applied_once(store: ProfileStore, store_url: str) -> None:
    store.update("t", "u", increment)
    again = open_store(store_url)
    try:
        assert again.get("t", "u").version == 1
    finally:
        again.close()
    versions = raw(store_url, "SELECT version FROM schema_version ORDER BY version")
    assert [v for (v,) in versions] == [m.version for m in migrations.MIGRATIONS]


def test_two_stores_opening_at_once(store_url: str) -> None:
    """Replicas starting together: the migration runs once (PostgreSQL's advisory lock)."""
    opened: list[ProfileStore] = []
    threads = [threading.Thread(target=lambda: opened.append(open_store(store_url)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(opened) == 4
    for each in opened:
        each.close()
    assert len(raw(store_url, "SELECT version FROM schema_version")) == migrations.LATEST


def test_newer_schema_is_refused(store: ProfileStore, store_url: str) -> None:
    store.close()
    raw(store_url, f"INSERT INTO schema_version (version, applied) "
                   f"VALUES ({migrations.LATEST + 1}, 0)")
    with pytest.raises(PadlmError, match="newer than this padlm") as caught:
        open_store(store_url)
    assert caught.value.param == "profiles"


def test_store_kind_and_redacted_url(store: ProfileStore, store_url: str) -> None:
    kind = SqliteStore if store_url.startswith("sqlite") else PostgresStore
    assert isinstance(store, kind) and store.url == store_url  # no password to redact here


@pytest.mark.parametrize("url", [
    "mysql://root:hunter2@db/profiles", "sqlite://relative.db", "sqlite:///", "profiles.db",
    "sqlite:///:memory:", "",
])
def test_unknown_url_is_refused(url: str) -> None:
    with pytest.raises(PadlmError, match="sqlite:///PATH .* or postgresql://") as caught:
        open_store(url)
    assert caught.value.param == "profiles" and "hunter2" not in str(caught.value)


def test_unreachable_postgres_names_the_url_without_its_password() -> None:
    with pytest.raises(PadlmError, match=r"postgresql://padlm:\*\*\*@127.0.0.1:1/db") as caught:
        open_store("postgresql://padlm:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(caught.value) and caught.value.param == "profiles"


def test_sqlite_creates_parent_directories_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "profiles.db"
    store = open_store(f"sqlite:///{path}")
    store.close()
    assert raw(f"sqlite:///{path}", "PRAGMA journal_mode") == [("wal",)]


def test_default_store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PADLM_HOME", str(tmp_path / "home"))
    assert default_store_url() == f"sqlite:///{tmp_path / 'home' / 'profiles.db'}"
    open_store(default_store_url()).close()
    assert (tmp_path / "home" / "profiles.db").is_file()


def test_store_imports_neither_torch_nor_psycopg(tmp_path: Path) -> None:
    """torch: the CLI's profile commands load no model; psycopg: SQLite needs none (the vLLM
    environment pins its own dependencies and has none)."""
    code = ("import sys\n"
            "from padlm.profiles.store import open_store\n"
            f"open_store('sqlite:///{tmp_path / 'p.db'}').close()\n"
            "loaded = {'torch', 'psycopg'} & set(sys.modules)\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True)
