"""`laueflow run` and `laueflow watch` sending their results with Globus Transfer while they go on.

Real runs (threads site, real HDF5 point and per-depth files) with a ``transfer`` section in their
configuration.  Every Globus request goes through globus-sdk's service-account login and TransferClient
into the ``responses`` mock (which patches requests in every thread of the process) and is answered with
globus-sdk's own registered test responses, as in test_transfer.py.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import responses
import yaml
from click.testing import CliRunner, Result
from conftest import use_tiles
from test_transfer import (
    DEST,
    SOURCE,
    TRANSFER_API,
    get_response_set,
    load_response,
    requests_to,
    task_states,
)
from test_workflow import check_point_file

from laueflow.cli import main
from laueflow.config import load
from laueflow.simulate import simulate
from laueflow.transfer import COMPUTE_ID_VAR, COMPUTE_SECRET_VAR, ID_VAR, SECRET_VAR, run_files

SECRET = "very-s3cret-client-value"
DEST_PATH = "/data/laue"
RUN_OPTIONS = ["--site", "threads", "--workers", "1", "--block-pixels", "64", "--per-depth-files"]


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    """A simulated three-point scan (24 frames a point, 16 x 16 pixels, a depth grid of 36 bins)."""
    folder = tmp_path_factory.mktemp("transfer_run") / "scan"
    simulate(folder, preset="multipoint", points=2, region=16, seed=3, frames=24)
    use_tiles(folder, 64)
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    raw["geo"]["source"]["grid"] = [-0.15, 0.2, 0.01]  # fewer per-depth files, a quicker decode
    (folder / "config.yaml").write_text(yaml.safe_dump(raw))
    return folder


def with_transfer(scan: Path, name: str, **transfer) -> Path:
    """The scan's configuration plus a transfer section, as SCAN/<name>.yaml (its relative paths stay
    valid).  The source collection's root is the scan's parent folder; every finished point goes at
    once (a batch of one file, no waiting)."""
    raw = yaml.safe_load((scan / "config.yaml").read_text())
    raw["transfer"] = {"source": SOURCE, "destination": DEST, "destination_path": DEST_PATH,
                       "source_root": str(scan.parent), "batch_files": 1, "batch_seconds": 0, "retries": 0,
                       "timeout": 60, **transfer}
    path = scan / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Globus:
    """The Globus side of a run: service-account token, submission ids, numbered transfer tasks.

    Submissions get task ids ``task-1``, ``task-2``, ...; each records the state ``OUT/status.json`` had
    when it arrived (whether the run was still going on) and calls ``on_submit(task_id)``.  Every task
    reports ``final_state`` (with ``fatal`` as its error when FAILED).
    """

    def __init__(self, mock: responses.RequestsMock, out: Path, final_state: str, fatal: dict | None = None,
                 on_submit: Callable[[str], None] | None = None):
        self.mock, self.out, self.on_submit = mock, out, on_submit
        self.token = load_response("auth.oauth2_client_credentials_tokens", requests_mock=mock).metadata[
            "access_token"]
        load_response("transfer.get_submission_id", requests_mock=mock)
        self.body = get_response_set("transfer.submit_transfer").lookup("default").json
        self.seen: list[tuple[str, str]] = []  # (task id, status.json state at submission)
        self._lock = threading.Lock()
        mock.add_callback("POST", f"{TRANSFER_API}/transfer", callback=self._submit,
                          content_type="application/json")
        for k in range(1, 13):
            task_states(mock, f"task-{k}", final_state, fatal=fatal)

    def _submit(self, request) -> tuple[int, dict, str]:
        try:
            state = json.loads((self.out / "status.json").read_text())["state"]
        except (OSError, ValueError, KeyError):
            state = "(no status)"
        with self._lock:
            task_id = f"task-{len(self.seen) + 1}"
            self.seen.append((task_id, state))
        if self.on_submit is not None:
            self.on_submit(task_id)
        return 200, {}, json.dumps({**self.body, "task_id": task_id})

    def documents(self) -> list[dict]:
        """The transfer documents submitted, in order."""
        docs = [json.loads(p.body) for p in requests_to(self.mock, "POST", "/transfer")]
        assert len(docs) == len(self.seen)
        assert all(d["source_endpoint"] == SOURCE and d["destination_endpoint"] == DEST for d in docs)
        return docs

    def items(self) -> list[tuple[str, str]]:
        """(source path, destination path) of every file submitted, in order."""
        return [(i["source_path"], i["destination_path"]) for d in self.documents() for i in d["DATA"]]


@pytest.fixture
def service_account(monkeypatch, tmp_path) -> Iterator[responses.RequestsMock]:
    """Client credentials in the environment (and an empty user token cache), and the mock every
    request meets."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(ID_VAR, str(uuid.uuid4()))
    monkeypatch.setenv(SECRET_VAR, SECRET)
    monkeypatch.delenv(COMPUTE_ID_VAR, raising=False)
    monkeypatch.delenv(COMPUTE_SECRET_VAR, raising=False)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def expected_items(out: Path) -> list[tuple[str, str]]:
    """Every result file of OUT as (path on the source collection, path on the destination)."""
    rels = [p.relative_to(out).as_posix() for p in run_files(out)]
    return [(f"/{out.name}/{rel}", f"{DEST_PATH}/{out.name}/{rel}") for rel in rels]


def no_secrets(r: Result, out: Path, *secrets: str) -> None:
    text = r.output + (out / "status.json").read_text()
    for secret in secrets:
        assert secret not in text


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_run_sends_every_result(scan, service_account):
    out = scan.parent / "out_sent"
    cfg_file = with_transfer(scan, "sent")
    n_depths = load(cfg_file).geo.source.depths.size
    globus = Globus(service_account, out, "SUCCEEDED")
    r = invoke("run", scan, "--config", cfg_file, "--out", out, *RUN_OPTIONS)
    assert r.exit_code == 0, r.output
    assert f"transfer: finished files go to {DEST}:{DEST_PATH}/out_sent" in r.stdout

    # every point file and every per-depth file went exactly once, to <destination_path>/<OUT name>/
    files = run_files(out)
    assert len(files) == 3 * (1 + n_depths)
    assert [(p.name, len(list(p.glob("*.h5")))) for p in sorted((out / "depths").iterdir())] == [
        (f"point_{k:05d}", n_depths) for k in range(3)]
    items = globus.items()
    assert sorted(items) == sorted(expected_items(out)) and len(set(items)) == len(items)
    assert ("/out_sent/point_00002.h5", f"{DEST_PATH}/out_sent/point_00002.h5") in items
    depth = min((out / "depths" / "point_00001").glob("*.h5")).relative_to(out).as_posix()
    assert (f"/out_sent/{depth}", f"{DEST_PATH}/out_sent/{depth}") in items
    posts = requests_to(service_account, "POST", "/transfer")
    assert all(p.headers["Authorization"] == f"Bearer {globus.token}" for p in posts)  # the service account
    # Results leave while the run goes on: the driver lets the transfers talk to Globus every 5 s
    # (Transfers.poll_interval), so when more than that was left after the first point file, its task
    # went before the end.
    first, *_, last = sorted(p.stat().st_mtime for p in files if p.parent == out)
    if last - first >= 5.0 + 2.0:
        assert globus.seen[0][1] == "running", globus.seen

    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished"
    transfers = status["transfers"]
    task_ids = [task_id for task_id, _ in globus.seen]
    assert {k: v["state"] for k, v in transfers["tasks"].items()} == dict.fromkeys(task_ids, "SUCCEEDED")
    assert transfers["totals"] == {"files": len(files), "queued": 0, "active": 0, "succeeded": len(files),
                                   "failed": 0, "tasks": len(task_ids)}
    assert set(transfers["files"]) == {f"point_{k:05d}.h5" for k in range(3)}
    for k in range(3):
        entry = transfers["files"][f"point_{k:05d}.h5"]
        assert entry["state"] == "succeeded" and entry["task_id"] in task_ids and entry["attempts"] == 1
        folder = transfers["folders"][f"depths/point_{k:05d}"]
        assert folder["succeeded"] == folder["files"] == n_depths
    assert transfers["source_path"] == "/out_sent"
    assert transfers["destination_path"] == f"{DEST_PATH}/out_sent"
    assert not transfers["errors"] and not transfers["failed_files"]

    assert "transfer task task-1:" in r.stderr and "submitted" in r.stderr
    summary = (f"{len(files)} of {len(files)} files transferred to {DEST}:{DEST_PATH}/out_sent in "
               f"{len(task_ids)} task{'' if len(task_ids) == 1 else 's'}")
    assert summary in r.stdout.splitlines()
    assert r.stdout.strip().splitlines()[-1].startswith("3 points (3 done)")
    no_secrets(r, out, SECRET, globus.token)


def test_run_exits_1_when_transfers_fail(scan, service_account):
    """A task that fails is sent once more (retries: 1); when that fails too, the run exits 1, says why,
    and keeps its results."""
    out = scan.parent / "out_failed"
    cfg_file = with_transfer(scan, "failed", retries=1)
    fatal = {"code": "PERMISSION_DENIED", "description": "no write permission on /data/laue"}
    globus = Globus(service_account, out, "FAILED", fatal=fatal)
    r = invoke("run", scan, "--config", cfg_file, "--out", out, "--points", "0", *RUN_OPTIONS)
    assert r.exit_code == 1, r.output
    files = run_files(out)
    n = load(cfg_file).geo.source.depths.size + 1
    assert len(files) == n  # the point file and its per-depth files are all still there
    check_point_file(out / "point_00000.h5", load(cfg_file), 0)
    assert sorted(globus.items()) == sorted(expected_items(out) * 2)  # sent twice, then given up
    assert [task_id for task_id, _ in globus.seen] == ["task-1", "task-2"]

    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "finished" and status["points"]["0"]["state"] == "done"
    transfers = status["transfers"]
    assert transfers["totals"] == {"files": n, "queued": 0, "active": 0, "succeeded": 0, "failed": n,
                                   "tasks": 2}
    assert {k: (v["state"], v["attempt"]) for k, v in transfers["tasks"].items()} == {
        "task-1": ("FAILED", 1), "task-2": ("FAILED", 2)}
    reason = "PERMISSION_DENIED: no write permission on /data/laue"
    assert transfers["files"]["point_00000.h5"] == {"state": "failed", "task_id": "task-2", "attempts": 2,
                                                    "error": reason}
    assert transfers["folders"]["depths/point_00000"]["failed"] == n - 1
    assert len(transfers["failed_files"]) == n - 1
    assert any(f"task-1: {reason}" in e for e in transfers["errors"])

    assert f"{n} files will be sent again ({reason})" in r.stderr
    assert f"{n} files failed after 2 attempts: {reason}" in r.stderr
    assert f"0 of {n} files transferred to {DEST}:{DEST_PATH}/out_failed in 2 tasks; {n} failed" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith("1 point (1 done)")
    no_secrets(r, out, SECRET, globus.token)


@pytest.mark.parametrize("client_id", [True, False], ids=["native-app", "no-client-id"])
def test_run_without_a_login_stops_before_writing(scan, tmp_path, monkeypatch, client_id):
    """No service account and no cached login: exit 2 with how to log in; no request, nothing written."""
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty token cache
    for var in (ID_VAR, SECRET_VAR, COMPUTE_ID_VAR, COMPUTE_SECRET_VAR):
        monkeypatch.delenv(var, raising=False)
    extra = {"client_id": str(uuid.uuid4())} if client_id else {}
    cfg_file = with_transfer(scan, f"login_{client_id}", **extra)
    out = scan.parent / f"out_login_{client_id}"
    with responses.RequestsMock() as mock:  # nothing registered: any request would be refused
        r = invoke("run", scan, "--config", cfg_file, "--out", out, *RUN_OPTIONS)
        assert not mock.calls
    assert r.exit_code == 2, r.output
    if client_id:
        assert "error: not logged in to Globus for transfers" in r.stderr
        assert "laueflow transfer --login --config" in r.stderr and SECRET_VAR in r.stderr
    else:
        assert "error: no Globus client ID for logging in: set transfer.client_id" in r.stderr
    assert not out.exists()


def test_watch_sends_each_point_while_it_watches(scan, service_account):
    """The frames of point 1 appear only once the files of point 0 were submitted: the watch gets them
    only because transfers go out while it runs (else it would stop idle without point 1)."""
    watched, out = scan.parent / "watched", scan.parent / "out_watched"
    watched.mkdir()
    shutil.copy(with_transfer(scan, "watched"), watched / "config.yaml")
    shutil.copy(scan / "mask.npy", watched / "mask.npy")
    cfg = load(watched / "config.yaml")
    n = cfg.file.range[1]  # frames per point

    def copy_frames(point: int) -> None:
        for j in range(point * n, (point + 1) * n):
            shutil.copy(scan / f"scan_{j}.h5", watched / f"scan_{j}.h5")

    copy_frames(0)
    globus = Globus(service_account, out, "SUCCEEDED",
                    on_submit=lambda task_id: copy_frames(1) if task_id == "task-1" else None)
    r = invoke("watch", watched, "--out", out, "--points", "2", "--poll-interval", "0.2",
               "--until-idle", "20", *RUN_OPTIONS)
    assert r.exit_code == 0, r.output
    assert "watch stopped: points 0-1 are ready" in r.stdout
    assert globus.seen[0] == ("task-1", "running")
    first = globus.documents()[0]["DATA"]
    assert {i["source_path"].split("/")[2] for i in first} == {"point_00000.h5", "depths"}
    assert len(first) == cfg.geo.source.depths.size + 1  # point 0's files alone: point 1 was not there yet
    files = run_files(out)
    assert {p.name for p in files if p.parent == out} == {"point_00000.h5", "point_00001.h5"}
    assert sorted(globus.items()) == sorted(expected_items(out))

    status = json.loads((out / "status.json").read_text())
    assert {k: v["status"] for k, v in status["watch"]["points"].items()} == {"0": "done", "1": "done"}
    transfers = status["transfers"]
    assert transfers["totals"]["succeeded"] == transfers["totals"]["files"] == len(files)
    assert set(transfers["tasks"]) == {task_id for task_id, _ in globus.seen}
    assert f"{len(files)} of {len(files)} files transferred to {DEST}:{DEST_PATH}/out_watched" in r.stdout
    no_secrets(r, out, SECRET, globus.token)
