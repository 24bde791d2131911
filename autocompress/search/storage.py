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

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna

from autocompress.errors import InputError

__all__ = ["open_storage", "study_user_attrs", "check_storage_url", "InterruptSafeStorage", "ctrl_c_in_trials_only",
           "interrupt_safe", "interruptible", "local_storage"]

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


# --- Ctrl-C inside a trial's work, never inside a storage write ---------------------------------------------------
#
# A KeyboardInterrupt that lands inside SQLAlchemy makes it invalidate the connection under a cursor it still holds;
# closing that cursor later fails and SQLAlchemy logs "Error closing cursor ... Cannot operate on a closed database"
# with a traceback. In a journal file it could cut a line in half, and inside Optuna's own bookkeeping after a trial
# (``_tell_with_warning``) it leaves a local unset and turns into an UnboundLocalError. So while a search runs,
# Ctrl-C is held back, except inside a trial's own work (:func:`interruptible`: compressing, timing, training),
# where it stops the trial at once; storage calls made from there (an intermediate report) hold it again for their
# length. A Ctrl-C held back is raised as soon as a region that allows it is entered or resumed, or when the
# search ends.

_regions: list[bool] = []  # innermost last: True where Ctrl-C is raised at once
_pending = [False]


def _on_sigint(signum: int, frame: Any) -> None:
    if _regions and not _regions[-1]:
        _pending[0] = True
        return
    raise KeyboardInterrupt


def _raise_pending() -> None:
    if _pending[0]:
        _pending[0] = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def _region(allows: bool) -> Iterator[None]:
    if not _regions:  # no search is guarding this process (or not in the main thread): Python's own handler
        yield
        return
    _regions.append(allows)
    try:
        if allows:
            _raise_pending()
        yield
    finally:
        _regions.pop()
        if _regions[-1]:
            _raise_pending()


def interruptible() -> contextlib.AbstractContextManager[None]:
    """A trial's own work: Ctrl-C (also one held back before) stops it at once."""
    return _region(True)


@contextlib.contextmanager
def ctrl_c_in_trials_only() -> Iterator[None]:
    """For the length of a search: Ctrl-C waits until the work is in an :func:`interruptible` region, or until the
    search ends. Only the main thread can set a signal handler; elsewhere this does nothing, and Python's own
    handler stays."""
    if threading.current_thread() is not threading.main_thread() or _regions:
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _regions.append(False)
    _pending[0] = False
    try:
        yield
    finally:
        _regions.clear()
        signal.signal(signal.SIGINT, previous)
        _raise_pending()


def _deferring(name: str) -> Callable[..., Any]:
    def call(self: "InterruptSafeStorage", *args: Any, **kwargs: Any) -> Any:
        with _region(False):
            return getattr(self._inner, name)(*args, **kwargs)

    call.__name__ = name
    return call


class InterruptSafeStorage(optuna.storages.BaseStorage):
    """An Optuna storage whose every call finishes before a Ctrl-C is raised (see :func:`ctrl_c_in_trials_only`),
    and which is closed once, by its owner, after the search has stopped using it (:meth:`close`)."""

    def __init__(self, inner: optuna.storages.BaseStorage, close: Callable[[], None] | None = None) -> None:
        self._inner = inner
        self._close = close

    def close(self) -> None:
        """Release the connections (an RDB engine's pool); a second call does nothing."""
        close, self._close = self._close, None
        if close is not None:
            close()

    # every public method, defined in the class body so that BaseStorage's abstract methods count as implemented
    for _name in sorted(n for n in dir(optuna.storages.BaseStorage)
                        if not n.startswith("_") and callable(getattr(optuna.storages.BaseStorage, n))):
        locals()[_name] = _deferring(_name)
    del _name


def interrupt_safe(storage: optuna.storages.BaseStorage) -> InterruptSafeStorage:
    """``storage`` behind :class:`InterruptSafeStorage`; an RDB storage gets Optuna's trial cache in front (as
    ``create_study`` gives a URL) and its connection pool released on :meth:`~InterruptSafeStorage.close`."""
    if not isinstance(storage, optuna.storages.RDBStorage):
        return InterruptSafeStorage(storage)

    def dispose() -> None:
        storage.remove_session()
        storage.engine.dispose()

    return InterruptSafeStorage(optuna.storages.get_storage(storage), close=dispose)


def local_storage(db: Path) -> InterruptSafeStorage:
    """The run's own SQLite ``study.db`` (one process); the caller closes it when the search is over.

    Optuna writes each drawn parameter in its own transaction, about a hundred per trial of the ViT space. SQLite's
    default rollback journal syncs the file twice per transaction; its write-ahead log with ``synchronous=NORMAL``
    syncs only at checkpoints, which cuts the storage's share of a trial by more than half. A process killed
    mid-trial still loses nothing committed (the log is replayed on the next open); only a power cut can drop the
    last few transactions, never corrupt the file.
    """
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")

    def on_connect(connection: Any, _record: Any) -> None:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # the connection Optuna opened to create the tables: reopened with the pragmas
    return interrupt_safe(storage)
