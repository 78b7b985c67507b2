"""The profile store's schema, as an ordered list of migrations.

A database records the migrations applied to it in ``schema_version``; opening a store applies
the missing ones in one transaction (see :mod:`padlm.profiles.store`). Migrations are only ever
appended: an applied one is never edited, since databases out there already ran it. A database
newer than this code is refused rather than used, since an older padlm could silently drop
what a newer one stores.

SQL is written once where both databases agree; JSON is TEXT in SQLite and JSONB in
PostgreSQL, and the events' key is each database's own auto-increment. ``user`` is reserved
in PostgreSQL, hence ``user_id``.
"""

from __future__ import annotations

from dataclasses import dataclass

from padlm.errors import PadlmError


@dataclass(frozen=True)
class Migration:
    version: int
    note: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]

    def statements(self, dialect: str) -> tuple[str, ...]:
        return self.sqlite if dialect == "sqlite" else self.postgres


SCHEMA_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)"
)


def _initial(json_type: str, event_key: str) -> tuple[str, ...]:
    return (
        "CREATE TABLE profiles ("
        " tenant TEXT NOT NULL, user_id TEXT NOT NULL,"
        f" state {json_type} NOT NULL, choices INTEGER NOT NULL, text TEXT,"
        " created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL,"
        " version INTEGER NOT NULL,"
        " PRIMARY KEY (tenant, user_id))",
        "CREATE TABLE events ("
        f" id {event_key}, tenant TEXT NOT NULL, user_id TEXT NOT NULL,"
        " version INTEGER NOT NULL, created DOUBLE PRECISION NOT NULL,"
        f" event {json_type} NOT NULL)",
        "CREATE INDEX events_by_user ON events (tenant, user_id, id)",
        "CREATE TABLE responses ("
        " tenant TEXT NOT NULL, response_id TEXT NOT NULL, idx INTEGER NOT NULL,"
        f" user_id TEXT NOT NULL, features {json_type} NOT NULL,"
        " created DOUBLE PRECISION NOT NULL, expires DOUBLE PRECISION NOT NULL,"
        " PRIMARY KEY (tenant, response_id, idx))",
        "CREATE INDEX responses_by_user ON responses (tenant, user_id, created)",
        "CREATE INDEX responses_by_expiry ON responses (expires)",
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1, "profiles, the choices learned from (events), remembered responses",
        sqlite=_initial("TEXT", "INTEGER PRIMARY KEY AUTOINCREMENT"),
        postgres=_initial("JSONB", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
    ),
)
LATEST = MIGRATIONS[-1].version


def pending(current: int, url: str) -> list[Migration]:
    """The migrations a database at ``current`` still needs; refuses one newer than the code."""
    if current > LATEST:
        raise PadlmError(
            f"the profile store {url} has schema version {current}, newer than this padlm "
            f"knows (up to {LATEST}); upgrade padlm, or point it at another store",
            param="profiles",
        )
    return [m for m in MIGRATIONS if m.version > current]
