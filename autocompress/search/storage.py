"""Where an Optuna study lives when several processes share it (``--storage``).

Several ``autocompress search`` processes, on one machine or many, can work on one study when it lives in a storage
that is safe for concurrent writers:

* ``journal:PATH`` or a plain ``PATH``: Optuna's journal file (an append-only log, guarded by a lock file that also
  works on NFS). The simple choice for one machine or a shared disk.
* ``postgresql://...`` or ``mysql://...``: Optuna's RDB storage on a database server, for clusters (the driver,
  e.g. ``psycopg2``, must be installed).
* ``redis://...``: the journal kept in Redis (needs the ``redis`` package).

SQLite is refused here: it locks the whole file per write and fails under concurrent writers ("database is
locked"), and on network file systems its locking is unreliable; Optuna's documentation says the same. A run with a
single process keeps its SQLite ``study.db`` in the run directory and needs no ``--storage``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from autocompress.errors import InputError

__all__ = ["open_storage", "study_user_attrs", "check_storage_url"]

FIELD = "--storage"
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_RDB_SCHEMES = ("postgresql", "postgres", "mysql", "mariadb")
_WHY_NOT_SQLITE = (
    "SQLite is not safe for several concurrent workers (it locks the whole file and fails with 'database is "
    "locked'; on NFS its locks are unreliable). Use journal:PATH (a file on a local or shared disk) or a database "
    "server URL (postgresql://, mysql://); a single process needs no --storage (it keeps study.db in --out)"
)


def check_storage_url(url: str) -> str:
    """Refuse what cannot be shared safely, before any work is done; returns the kind (journal, rdb, redis)."""
    if not isinstance(url, str) or not url.strip():
        raise InputError(FIELD, "must be journal:PATH, a file path, or a database URL")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme.startswith("sqlite") or (not scheme and url.lower().endswith(_SQLITE_SUFFIXES)):
        raise InputError(FIELD, _WHY_NOT_SQLITE)
    if scheme.split("+", 1)[0] in _RDB_SCHEMES:
        return "rdb"
    if scheme in ("redis", "rediss"):
        return "redis"
    if scheme and not url.startswith("journal:"):
        raise InputError(FIELD, f"unknown storage scheme {scheme!r} (journal:PATH, postgresql://, mysql://, redis://)")
    return "journal"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The Optuna storage for ``url`` (see the module docstring); a journal file's folder is created if needed."""
    kind = check_storage_url(url)
    try:
        if kind == "rdb":
            return optuna.storages.RDBStorage(url)
        if kind == "redis":
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalRedisBackend(url))
        path = Path(url[len("journal:"):] if url.startswith("journal:") else url).expanduser()
        if path.is_dir():
            raise InputError(FIELD, f"{path} is a folder; give the journal file's name (e.g. {path / 'study.journal'})")
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    except InputError:
        raise
    except ImportError as exc:
        raise InputError(FIELD, f"the driver for {url.split('://')[0]} is not installed ({exc})") from None
    except Exception as exc:  # a server that cannot be reached, a path that cannot be written
        raise InputError(FIELD, f"cannot open the storage {url!r} ({type(exc).__name__}: {exc})") from None


def study_user_attrs(url: str, study_name: str) -> dict[str, Any] | None:
    """The user attributes of the study ``study_name`` in ``url`` (its baseline, budget...), or None if there is none
    yet. Lets a worker that joins a shared study take the baseline measured by the first one instead of its own."""
    storage = open_storage(url)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(study_id)
