"""Globus Transfer of finished results: queue files as they appear, send them in batches, follow the tasks.

A :class:`Transfers` object is fed the files of a run as they are finished (``add``, which never touches
the network) and moves them with Globus Transfer from ``settings.source`` to
``<settings.destination_path>/<OUT name>/`` on ``settings.destination``.  The driver calls ``poll``
every few seconds; the network work (submitting batches, asking for task states, cancelling tasks that
took too long, resubmitting failed ones up to ``settings.retries`` times) runs in one background thread
at a time, so a slow or unreachable Globus service never holds back the reconstruction.  ``snapshot``
gives the state for ``status.json`` and ``finish`` sends what is left and waits.

Authentication uses globus-sdk's own mechanisms (:func:`transfer_client`): client credentials from
``LAUEFLOW_GLOBUS_CLIENT_ID``/``LAUEFLOW_GLOBUS_CLIENT_SECRET`` (or the ``GLOBUS_COMPUTE_CLIENT_ID``/
``GLOBUS_COMPUTE_CLIENT_SECRET`` pair of a Globus Compute service account), else a user login whose
tokens globus-sdk caches under ``~/.globus/app/``.  Secrets are never printed or written anywhere.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .config import Config, ConfigError, ConfigWarning, TransferConfig, from_dict, load
from .errors import TransferAuthError, TransferError  # noqa: F401 (re-exported)
from .io.export import depth_files
from .io.layout import RunFolder
from .io.pointfile import read_provenance
from .workflow.hooks import RunHooks
from .workflow.status import FILE_STATES, record_section

if TYPE_CHECKING:  # only for annotations: the driver loads Parsl and JAX
    from .workflow.dag import RunResult
    from .workflow.outcomes import PointResult

ID_VAR, SECRET_VAR = "LAUEFLOW_GLOBUS_CLIENT_ID", "LAUEFLOW_GLOBUS_CLIENT_SECRET"
COMPUTE_ID_VAR, COMPUTE_SECRET_VAR = "GLOBUS_COMPUTE_CLIENT_ID", "GLOBUS_COMPUTE_CLIENT_SECRET"
APP_NAME = "laueflow"
MAX_ITEMS = 1000  # files per transfer task
MAX_ACTIVE = 32  # tasks in flight at once (Globus limits the active tasks of one identity)

ACTIVE, SUCCEEDED, FAILED = "ACTIVE", "SUCCEEDED", "FAILED"  # Globus task states (and INACTIVE)
TIMEOUT = "TIMEOUT"  # ours: cancelled after settings.timeout
COUNTS = ("files_transferred", "files_skipped", "bytes_transferred")  # progress fields of a Globus task


LOGIN_HINT = ("log in once on this machine with `laueflow transfer --login --config BEAMLINE.yaml` "
              f"(globus-sdk caches the tokens under ~/.globus/app/), or, for a service account, set {ID_VAR} "
              f"and {SECRET_VAR} (or {COMPUTE_ID_VAR} and {COMPUTE_SECRET_VAR})")


def _globus_sdk() -> Any:
    """globus-sdk, an optional dependency (laueflow[globus]): imported only when transfers are used."""
    try:
        import globus_sdk
    except ImportError:
        raise TransferError("Globus Transfer needs globus-sdk: pip install 'laueflow[globus]'") from None
    return globus_sdk


def _credentials() -> tuple[str | None, str | None]:
    """A service account's client ID and secret from the environment, if any."""
    cid, secret = os.environ.get(ID_VAR), os.environ.get(SECRET_VAR)
    if secret:
        if not cid:
            raise TransferAuthError(f"{SECRET_VAR} is set but {ID_VAR} is not: a service account needs both")
        return cid, secret
    cid2, secret2 = os.environ.get(COMPUTE_ID_VAR), os.environ.get(COMPUTE_SECRET_VAR)
    if cid2 and secret2:
        return cid2, secret2
    return cid, None


def transfer_client(settings: TransferConfig, login: bool = False) -> Any:
    """A ``globus_sdk.TransferClient`` with the standard authentication.

    With client credentials in the environment it is a service account (``ClientApp``, tokens kept in
    memory).  Otherwise it is a user login (``UserApp``) with the native-app client ID of
    ``settings.client_id`` or ``$LAUEFLOW_GLOBUS_CLIENT_ID`` and refresh tokens cached by globus-sdk.
    ``login=True`` runs the interactive login when one is needed (``laueflow transfer --login``);
    otherwise a missing login raises :class:`TransferAuthError` instead of prompting, so that an
    unattended run never waits for a person.
    """
    globus_sdk = _globus_sdk()
    cid, secret = _credentials()
    if secret:
        app: Any = globus_sdk.ClientApp(APP_NAME, client_id=cid, client_secret=secret,
                                        config=globus_sdk.GlobusAppConfig(token_storage="memory"))
    else:
        native = settings.client_id or cid
        if not native:
            raise TransferAuthError(
                "no Globus client ID for logging in: set transfer.client_id (a native app registered at "
                f"https://app.globus.org/settings/developers) or {ID_VAR}; or set {ID_VAR} and "
                f"{SECRET_VAR} for a service account")
        # without login=True a missing or expired login raises instead of prompting
        options: dict[str, Any] = {} if login else {"token_validation_error_handler": None}
        config = globus_sdk.GlobusAppConfig(request_refresh_tokens=True, **options)
        app = globus_sdk.UserApp(APP_NAME, client_id=native, config=config)
    client = globus_sdk.TransferClient(app=app)
    if settings.data_access:
        client.add_app_data_access_scope(list(settings.data_access))
    if secret:
        return client
    if login:
        app.login()
    elif app.login_required():
        raise TransferAuthError("not logged in to Globus for transfers: " + LOGIN_HINT)
    return client


class TransferState(StrEnum):
    """A file's transfer state (the values are written to status.json)."""

    QUEUED = "queued"  # waiting for its batch (a retry: for its time)
    SUBMITTING = "submitting"  # in a batch being submitted now; reported as queued
    ACTIVE = "active"  # in a Globus task that has not ended
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # no attempts left


# the states status.json counts, in this order (a file being submitted counts as queued)
REPORTED = (TransferState.QUEUED, TransferState.ACTIVE, TransferState.SUCCEEDED, TransferState.FAILED)
PENDING = (TransferState.QUEUED, TransferState.SUBMITTING, TransferState.ACTIVE)  # not yet arrived or failed


def _shown(state: TransferState) -> str:
    """A file's state as reported: one being submitted right now is still queued."""
    return (TransferState.QUEUED if state == TransferState.SUBMITTING else state).value


def _state_counts() -> dict[str, int]:
    """Zero files in each reported state."""
    return {s.value: 0 for s in REPORTED}


def _iso() -> str:
    """The current time, ISO 8601 with the local UTC offset."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _n_files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _error_text(exc: BaseException) -> str:
    """One line about a failed call (Globus API errors by status, code and message)."""
    status, code, message = (getattr(exc, k, None) for k in ("http_status", "code", "message"))
    if status is not None:
        return f"{type(exc).__name__} {status} {code or ''}: {message or ''}".strip()
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


@dataclass
class _File:
    rel: str
    path: Path
    queued_at: float
    size: int = 0
    mtime_ns: int = 0
    state: TransferState = TransferState.QUEUED
    attempts: int = 0
    not_before: float = 0.0  # a retry waits until then
    retry: bool = False
    task_id: str | None = None
    error: str = ""
    removed: bool = False


@dataclass
class _Task:
    task_id: str
    files: list[str]
    attempt: int
    started: float
    submitted: str
    state: str = ACTIVE
    finished: str | None = None
    detail: str = ""  # Globus's nice_status while active, the reason when it failed
    counts: dict[str, int] = field(default_factory=dict)


class Transfers:
    """Globus transfers of one output folder (see the module docstring).

    ``client`` is a ``globus_sdk.TransferClient`` (default: :func:`transfer_client`).  ``report`` receives
    one line per event (task submitted, succeeded, failed, retried).  ``clock`` and ``sleep`` measure and
    pass time (monotonic seconds); ``poll_interval`` is the pause between checks in :meth:`finish`.
    """

    def __init__(self, settings: TransferConfig, out_dir: str | os.PathLike, client: Any = None, *,
                 report: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, poll_interval: float = 5.0):
        self._sdk = _globus_sdk()
        self.settings = settings
        self.out_dir = Path(out_dir).resolve()
        root = Path(settings.source_root).expanduser().resolve()
        if not (self.out_dir == root or root in self.out_dir.parents):
            raise TransferError(f"output folder {self.out_dir} is not inside transfer.source_root {root}, "
                                "so it has no path on the source collection")
        self.source_dir = "/" + self.out_dir.relative_to(root).as_posix() if self.out_dir != root else "/"
        name = self.out_dir.name or "results"
        self.destination_dir = f"{settings.destination_path.rstrip('/')}/{name}"
        self._label = re.sub(r"[^A-Za-z0-9 _,.-]", "-", f"laueflow {name}")[:100]
        self.client = client if client is not None else transfer_client(settings)
        self._report = report or (lambda line: None)
        self._clock, self._sleep, self.poll_interval = clock, sleep, poll_interval
        self._files: dict[str, _File] = {}
        self._tasks: dict[str, _Task] = {}
        self._errors: list[str] = []
        self._lock = threading.RLock()
        self._busy = threading.Lock()  # held while one step talks to Globus
        self._thread: threading.Thread | None = None
        self._flush = False

    # -- the driver's side: none of these wait for the network -----------------------------------------

    def add(self, paths: Iterable[str | os.PathLike]) -> None:
        """Queue finished files (absolute, or relative to the output folder) for transfer.

        A file queued again after it was sent (rewritten by a rerun, say) is sent again.
        """
        now = self._clock()
        with self._lock:
            for p in paths:
                path = Path(p)
                path = (path if path.is_absolute() else self.out_dir / path).resolve()
                if self.out_dir not in path.parents:
                    raise ValueError(f"{path} is not inside the output folder {self.out_dir}")
                rel = path.relative_to(self.out_dir).as_posix()
                known = self._files.get(rel)
                if known is not None and known.state == TransferState.QUEUED:
                    continue
                self._files[rel] = _File(rel=rel, path=path, queued_at=now)

    def poll(self, wait: bool = False) -> None:
        """Submit due batches, follow the tasks and resubmit failed ones, in a background thread.

        Returns at once unless ``wait`` (then it runs one step here, after the one in progress, if any).
        """
        if wait:
            with self._busy:
                self._step()
            return
        if not self._busy.acquire(blocking=False):
            return  # the previous step is still talking to Globus

        def run() -> None:
            try:
                self._step()
            except Exception as exc:  # never let the background thread die unseen
                self._note(f"transfers: {_error_text(exc)}", error=True)
            finally:
                self._busy.release()

        self._thread = threading.Thread(target=run, name="laueflow-transfers", daemon=True)
        self._thread.start()

    def patience(self) -> float:
        """Seconds :meth:`finish` should wait so that every retry of a timed-out task can still run."""
        return (self.settings.retries + 1) * (self.settings.timeout + self.poll_interval) + 60.0

    def finish(self, timeout: float) -> bool:
        """Submit everything still queued and wait up to ``timeout`` seconds for every task to end.

        Returns True when every file arrived.  Tasks still running at the timeout keep running at
        Globus; :meth:`snapshot` shows them as active.
        """
        deadline = self._clock() + timeout
        self._flush = True
        while True:
            self.poll(wait=True)
            if not self.pending:
                break
            if self._clock() >= deadline:
                self._note(f"transfers: gave up waiting after {timeout:g} s with {_n_files(self.pending)} "
                           "not yet transferred")
                break
            self._sleep(self.poll_interval)
        return self.ok

    @property
    def pending(self) -> int:
        """Files queued or in an active task."""
        with self._lock:
            return sum(f.state in PENDING for f in self._files.values())

    @property
    def ok(self) -> bool:
        """True when every file that was added has arrived."""
        with self._lock:
            return all(f.state == TransferState.SUCCEEDED for f in self._files.values())

    def counts(self) -> dict[str, int]:
        """Files by state, and the number of tasks."""
        with self._lock:
            out = {"files": len(self._files), **_state_counts()}
            for f in self._files.values():
                out[_shown(f.state)] += 1
            out["tasks"] = len(self._tasks)
            return out

    def snapshot(self) -> dict[str, Any]:
        """The state for ``status.json["transfers"]`` (plain JSON types).

        ``files`` has one entry per file directly in the output folder (the point files); files in
        subfolders (per-depth files) are counted per folder in ``folders``, and listed in ``failed_files``
        when they failed, so that the snapshot stays small for runs with many thousand files.
        """
        with self._lock:
            files: dict[str, Any] = {}
            folders: dict[str, dict[str, Any]] = {}
            failed: list[dict[str, Any]] = []
            for f in self._files.values():
                entry = {"state": _shown(f.state), "task_id": f.task_id, "attempts": f.attempts,
                         "error": f.error}
                if f.removed:
                    entry["removed_locally"] = True
                folder, _, _ = f.rel.rpartition("/")
                if not folder:
                    files[f.rel] = entry
                    continue
                group = folders.setdefault(folder, {"files": 0, **_state_counts(), "attempts": 0,
                                                    "task_ids": []})
                group["files"] += 1
                group[_shown(f.state)] += 1
                group["attempts"] = max(group["attempts"], f.attempts)
                if f.task_id and f.task_id not in group["task_ids"]:
                    group["task_ids"].append(f.task_id)
                if f.state == TransferState.FAILED:
                    failed.append({"file": f.rel, **entry})
            tasks = {t.task_id: {"state": t.state, "files": len(t.files), "attempt": t.attempt,
                                 "submitted": t.submitted, "finished": t.finished, "detail": t.detail,
                                 **t.counts} for t in self._tasks.values()}
            s = self.settings
            return {
                "source": s.source, "source_path": self.source_dir, "destination": s.destination,
                "destination_path": self.destination_dir, "sync_level": s.sync_level,
                "verify_checksum": s.verify_checksum, "retries": s.retries, "timeout": s.timeout,
                "remove_local": s.remove_local, "totals": self.counts(), "files": files, "folders": folders,
                "failed_files": failed, "tasks": tasks, "errors": list(self._errors[-10:]), "updated": _iso(),
            }

    def summary(self) -> str:
        """One line for humans."""
        c = self.counts()
        head = (f"{c['succeeded']} of {_n_files(c['files'])} transferred to {self.settings.destination}:"
                f"{self.destination_dir} in {c['tasks']} task{'' if c['tasks'] == 1 else 's'}")
        rest = [f"{c[k]} {k}" for k in (TransferState.FAILED, TransferState.ACTIVE, TransferState.QUEUED)
                if c[k]]
        return head + (f"; {', '.join(rest)}" if rest else "")

    # -- the network side: one step at a time ----------------------------------------------------------

    def _note(self, line: str, error: bool = False) -> None:
        if error:
            with self._lock:
                self._errors.append(f"{_iso()} {line}")
        self._report(line)

    def _step(self) -> None:
        """Check the tasks in flight, then submit what is due."""
        with self._lock:
            active = [t for t in self._tasks.values() if t.state not in (SUCCEEDED, FAILED, TIMEOUT)]
        for task in active:
            self._check(task)
        while True:
            batch = self._take_batch()
            if not batch:
                break
            self._submit(batch)

    def _take_batch(self) -> list[_File]:
        """The files to submit now: retries that are due, and new files once a batch is full or old."""
        now = self._clock()
        s = self.settings
        with self._lock:
            in_flight = sum(t.state not in (SUCCEEDED, FAILED, TIMEOUT) for t in self._tasks.values())
            if in_flight >= MAX_ACTIVE:
                return []
            queued = [f for f in self._files.values()
                      if f.state == TransferState.QUEUED and f.not_before <= now]
            if not queued:
                return []
            due = (self._flush or any(f.retry for f in queued) or len(queued) >= s.batch_files
                   or now - min(f.queued_at for f in queued) >= s.batch_seconds)
            if not due:
                return []
            batch = sorted(queued, key=lambda f: (not f.retry, f.queued_at, f.rel))[:MAX_ITEMS]
            for f in batch:
                f.state = TransferState.SUBMITTING
            return batch

    def _submit(self, batch: list[_File]) -> None:
        s = self.settings
        ready: list[_File] = []
        for f in batch:
            try:
                st = f.path.stat()
            except OSError:
                self._fail_file(f, "the file no longer exists")
                continue
            f.size, f.mtime_ns = st.st_size, st.st_mtime_ns
            ready.append(f)
        if not ready:
            return
        attempt = max(f.attempts for f in ready) + 1
        deadline = _dt.datetime.now(_dt.UTC) + _dt.timedelta(seconds=s.timeout)
        data = self._sdk.TransferData(
            source_endpoint=s.source, destination_endpoint=s.destination,
            label=f"{self._label} {len(self._tasks) + 1}", sync_level=s.sync_level,
            verify_checksum=s.verify_checksum, deadline=deadline.isoformat(timespec="seconds"),
            fail_on_quota_errors=True, notify_on_succeeded=False)
        for f in ready:
            data.add_item(f"{self.source_dir.rstrip('/')}/{f.rel}", f"{self.destination_dir}/{f.rel}")
        try:
            response = self.client.submit_transfer(data)
            task_id = str(response["task_id"])
        except Exception as exc:  # the service, the network or the login: retried like a failed task
            self._retry_or_fail(ready, f"submission failed: {_error_text(exc)}", submitted=False)
            return
        with self._lock:
            self._tasks[task_id] = _Task(task_id=task_id, files=[f.rel for f in ready], attempt=attempt,
                                         started=self._clock(), submitted=_iso())
            for f in ready:
                if f.state == TransferState.SUBMITTING:
                    f.state, f.task_id, f.retry, f.error = TransferState.ACTIVE, task_id, False, ""
                    f.attempts += 1
        self._note(f"transfer task {task_id}: {_n_files(len(ready))} submitted"
                   + (f" (attempt {attempt} of {s.retries + 1})" if attempt > 1 else ""))

    def _check(self, task: _Task) -> None:
        """Ask Globus for a task's state and act on it; cancel it when it took too long."""
        try:
            doc = self.client.get_task(task.task_id)
            status = str(doc["status"])
        except Exception as exc:
            self._note(f"transfer task {task.task_id}: state unknown ({_error_text(exc)})", error=True)
            status = None
        else:
            with self._lock:
                task.state = status
                task.counts = {k: int(doc[k]) for k in COUNTS if isinstance(doc.get(k), int)}
                if status not in (SUCCEEDED, FAILED):
                    task.detail = str(doc.get("nice_status") or "")
        if status == SUCCEEDED:
            self._succeeded(task)
        elif status == FAILED:
            fatal = doc.get("fatal_error") or {}
            reason = (f"{fatal.get('code', '')}: {fatal.get('description', '')}".strip(": ") if fatal
                      else str(doc.get("nice_status") or "failed"))
            self._ended(task, FAILED, reason)
        elif self._clock() - task.started >= self.settings.timeout:
            try:
                self.client.cancel_task(task.task_id)
            except Exception as exc:  # cancelled or finished meanwhile, or unreachable: resubmit all the same
                self._note(f"transfer task {task.task_id}: cancel failed ({_error_text(exc)})", error=True)
            self._ended(task, TIMEOUT, f"timed out after {self.settings.timeout:g} s and was cancelled")

    def _succeeded(self, task: _Task) -> None:
        removed = 0
        with self._lock:
            task.finished = _iso()
            mine = [self._files[r] for r in task.files if self._files.get(r) and self._files[r].task_id ==
                    task.task_id and self._files[r].state == TransferState.ACTIVE]
            for f in mine:
                f.state, f.error = TransferState.SUCCEEDED, ""
        if self.settings.remove_local:
            for f in mine:
                removed += self._remove(f)
        self._note(f"transfer task {task.task_id}: {_n_files(len(task.files))} transferred"
                   + (f", {removed} removed locally" if removed else ""))

    def _remove(self, f: _File) -> int:
        """Delete a transferred file, only if it is still the version that was sent."""
        try:
            st = f.path.stat()
            if (st.st_size, st.st_mtime_ns) != (f.size, f.mtime_ns):
                return 0
            f.path.unlink()
        except OSError:
            return 0
        f.removed = True
        return 1

    def _ended(self, task: _Task, state: str, reason: str) -> None:
        with self._lock:
            task.state, task.finished, task.detail = state, _iso(), reason
            mine = [self._files[r] for r in task.files if self._files.get(r) and self._files[r].task_id ==
                    task.task_id and self._files[r].state == TransferState.ACTIVE]
        self._note(f"transfer task {task.task_id}: {reason}", error=True)
        self._retry_or_fail(mine, reason, submitted=True)

    def _retry_or_fail(self, files: Sequence[_File], reason: str, submitted: bool) -> None:
        """Queue files again while they have attempts left, else mark them failed."""
        s = self.settings
        now = self._clock()
        retried = failed = 0
        with self._lock:
            for f in files:
                if not submitted:
                    f.attempts += 1
                if f.attempts <= s.retries:
                    # a failed submission waits a little (the service may be down); a failed task goes at once
                    delay = 0.0 if submitted else min(300.0, 5.0 * 2 ** (f.attempts - 1))
                    f.state, f.retry, f.not_before, f.error = TransferState.QUEUED, True, now + delay, reason
                    retried += 1
                else:
                    self._fail_file(f, reason)
                    failed += 1
        if retried:
            self._note(f"transfers: {_n_files(retried)} will be sent again ({reason})", error=not submitted)
        if failed:
            self._note(f"transfers: {_n_files(failed)} failed after "
                       f"{s.retries + 1} attempts: {reason}", error=True)

    def _fail_file(self, f: _File, reason: str) -> None:
        with self._lock:
            f.state, f.error = TransferState.FAILED, reason


# ----------------------------------------------------------------------------------------------------
# A finished run: its files, its settings, its status file


def run_files(out_dir: str | os.PathLike) -> list[Path]:
    """The finished result files of a run folder (:meth:`RunFolder.result_files`): ``point_<k>.h5``
    first, then the HDF5 files in its subfolders (per-depth files)."""
    return RunFolder(out_dir).result_files()


def recorded_settings(out_dir: str | os.PathLike) -> TransferConfig | None:
    """The transfer settings of the configuration a run used, read from its first point file's provenance:
    the configuration file when it still exists, else the configuration recorded in the file."""
    points = [p for p in run_files(out_dir) if p.parent == Path(out_dir)]
    for point in points[:1]:
        prov = read_provenance(point) or {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            try:
                path = prov.get("config_file") or ""
                if path and Path(path).is_file():
                    return load(path, check_files=False).transfer
                if prov.get("config"):
                    raw = yaml.safe_load(prov["config"]) or {}
                    return from_dict(raw, str(point), check_files=False).transfer
            except (ConfigError, yaml.YAMLError):
                return None
    return None


def record_status(out_dir: str | os.PathLike, snapshot: dict[str, Any]) -> bool:
    """Put a snapshot into ``OUT/status.json["transfers"]`` (atomically), unless a live driver owns the
    file (it records its own transfers) or there is no status file.  Returns whether it was written."""
    return record_section(out_dir, "transfers", snapshot)


def settings_dict(settings: TransferConfig) -> dict[str, Any]:
    """The settings as a plain ``transfer`` section (for merging command-line options)."""
    d = asdict(settings)
    d["data_access"] = list(d["data_access"])
    return d


class TransferHooks(RunHooks):
    """Globus Transfer of a run's results while it goes on, as a run hook: each written point file (and
    its per-depth files) is queued as its point ends, Globus is asked about every ``poll_interval``
    seconds, and the transfers' state goes into status.json (``transfers``).  After the run,
    :meth:`finish` waits for the last transfers.  ``say`` prints results, ``note`` events and problems.
    """

    def __init__(self, transfers: Transfers, say: Callable[[str], None] = print,
                 note: Callable[[str], None] = print) -> None:
        self.transfers = transfers
        self.say = say
        self.note = note
        self.last_poll = float("-inf")

    @classmethod
    def start(cls, cfg: Config, out_dir: str | os.PathLike, say: Callable[[str], None] = print,
              note: Callable[[str], None] = print) -> TransferHooks | None:
        """Hooks for the configuration's ``transfer`` section, or None without one; a missing login
        raises TransferError here, before anything runs."""
        if cfg.transfer is None:
            return None
        return cls(Transfers(cfg.transfer, out_dir, report=note), say=say, note=note)

    def on_point_done(self, result: PointResult) -> None:
        if result.file and result.status in FILE_STATES:
            self.transfers.add([result.file, *depth_files(result.file, result.point)])

    def status_section(self) -> dict[str, Any]:
        return {"transfers": self.transfers.snapshot()}

    def tick(self) -> None:
        """Called by the driver about every second: talk to Globus every ``poll_interval`` seconds
        (5 by default), so that following many tasks stays well within Globus's request limits."""
        now = time.monotonic()
        if now - self.last_poll >= self.transfers.poll_interval:
            self.last_poll = now
            self.transfers.poll()

    def finish(self, result: RunResult | None) -> RunResult | None:
        """Wait for the last transfers (long enough for every retry) and record them in status.json; a
        failed transfer marks ``result`` (the command exits non-zero).  ``result`` None: the run was
        interrupted; then nothing is waited for (a rerun or `laueflow transfer` sends the rest)."""
        if result is None:
            record_status(self.transfers.out_dir, self.transfers.snapshot())
            self.note(f"transfers: {self.transfers.pending} files not sent yet; run again or use "
                      f"`laueflow transfer {self.transfers.out_dir}`")
            return result
        sent = self.transfers.finish(timeout=self.transfers.patience())
        record_status(self.transfers.out_dir, self.transfers.snapshot())
        self.say(self.transfers.summary())
        if not sent:
            result.transfers_failed = True
        return result
