"""Globus Transfer of results: the real globus-sdk client against its own registered test responses.

Every request goes through globus-sdk's TransferClient (and, for service accounts, its ClientApp and the
Globus Auth token call) into the ``responses`` mock, as globus-sdk's own tests do; nothing else is faked
but the clock.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path

import globus_sdk
import h5py
import numpy as np
import pytest
import responses
import yaml
from click.testing import CliRunner
from test_export import FRAME, write_point_file

from laueflow import provenance
from laueflow.cli import main
from laueflow.config import ConfigError, ConfigWarning, from_dict, load, transfer_settings
from laueflow.io import pointfile
from laueflow.io.export import export_point
from laueflow.io.layout import RunFolder
from laueflow.transfer import (
    COMPUTE_ID_VAR,
    COMPUTE_SECRET_VAR,
    ID_VAR,
    SECRET_VAR,
    SUCCEEDED,
    TransferAuthError,
    TransferError,
    TransferHooks,
    Transfers,
    TransferState,
    record_status,
    recorded_settings,
    run_files,
    transfer_client,
)
from laueflow.workflow.outcomes import PointResult
from laueflow.workflow.status import PointState

try:  # globus-sdk 4 made its test helpers public
    from globus_sdk.testing import RegisteredResponse, get_response_set, load_response
except ImportError:  # globus-sdk 3
    from globus_sdk._testing import RegisteredResponse, get_response_set, load_response

SOURCE = "4c0f4c7a-8f33-4bd4-a1b1-2d1e4f0c9a01"
DEST = "9d6d9a2e-3c4f-4a9b-8e7a-5f1b2c3d4e02"
TRANSFER_API = "https://transfer.api.globus.org/v0.10"


class Clock:
    """Monotonic seconds that pass only when the test (or a sleep) says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(seconds, 1.0)


@pytest.fixture
def rsps():
    """globus-sdk's standard submission-id response on an isolated ``responses`` mock."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        load_response("transfer.get_submission_id", requests_mock=mock)
        yield mock


def submitted(rsps, *task_ids: str, status: int = 200) -> None:
    """Answer the next submissions with these task ids (globus-sdk's own submit_transfer fixture)."""
    base = get_response_set("transfer.submit_transfer").lookup("default").json
    for task_id in task_ids:
        body = {**copy.deepcopy(base), "task_id": task_id}
        RegisteredResponse(service="transfer", method="POST", path="/v0.10/transfer", json=body,
                           status=status).add(requests_mock=rsps)


def task_states(rsps, task_id: str, *states: str, fatal: dict | None = None) -> None:
    """Answer successive get_task calls for one task with these states (the last one repeats)."""
    for state in states:
        body = {"DATA_TYPE": "task", "task_id": task_id, "type": "TRANSFER", "status": state,
                "nice_status": {"ACTIVE": "Queued", "SUCCEEDED": None}.get(state, "FILE_NOT_FOUND"),
                "files": 2, "files_transferred": 2 if state == "SUCCEEDED" else 0, "files_skipped": 0,
                "bytes_transferred": 4096 if state == "SUCCEEDED" else 0,
                "fatal_error": fatal if state == "FAILED" else None}
        RegisteredResponse(service="transfer", path=f"/v0.10/task/{task_id}", json=body).add(
            requests_mock=rsps)


def requests_to(rsps, method: str, path: str) -> list:
    return [c.request for c in rsps.calls if c.request.method == method and c.request.url.split("?")[0]
            == f"{TRANSFER_API}{path}"]


def beamline_config(tmp_path: Path, **transfer) -> Path:
    """A small valid beamline configuration with a transfer section."""
    raw = {"file": {"path": str(tmp_path / "scan"), "range": [0, 20, 1], "frame": [0, 8, 0, 8]},
           "geo": {"mask": {"bitsizes": [15.0, 7.5], "thickness": 3.7,
                            "focus": {"cenx": 0.0, "dist": 0.5, "cenz": 0.0, "anglex": 0.0, "angley": 0.0,
                                      "anglez": 0.0}},
                   "scanner": {"step": 1.0, "axis": [1.0, 0.0, 0.0]},
                   "detector": {"shape": [2048, 2048], "size": [409.6, 409.6], "rot": [-1.2, -1.21, -1.22],
                                "pos": [28.8, 2.7, 513.0]},
                   "source": {"grid": [-0.05, 0.05, 0.001]}},
           "transfer": {"source": SOURCE, "destination": DEST, "destination_path": "/data/laue",
                        "source_root": str(tmp_path), **transfer}}
    path = tmp_path / "beamline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def point_file(path: Path, config_file: Path | str = "", config_yaml: str = "") -> Path:
    """A finished point file as laueflow writes it, as far as transfers care: real HDF5 with provenance."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs[pointfile.FORMAT_ATTR] = pointfile.POINT_FORMAT
        f.create_group("entry/reconstruction").attrs["complete"] = True
        prov = provenance.build(config_yaml=config_yaml, config_fingerprint="0" * 16, inputs=[],
                                start_time=provenance.now(), config_file=str(config_file))
        provenance.write(f.create_group("entry/provenance"), prov)
    return path


def depth_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("entry1/data/data", data=[[1.0, 2.0]])
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    out = tmp_path / "scan_recon"
    cfg = beamline_config(tmp_path)
    for k in range(3):
        point_file(out / f"point_{k:05d}.h5", config_file=cfg)
    return out


def settings(tmp_path: Path, **overrides):
    section = {"source": SOURCE, "destination": DEST, "destination_path": "/data/laue/",
               "source_root": str(tmp_path), "batch_files": 2, "batch_seconds": 10, "retries": 1,
               "timeout": 100, **overrides}
    return transfer_settings(section)


def client() -> globus_sdk.TransferClient:
    return globus_sdk.TransferClient(authorizer=globus_sdk.AccessTokenAuthorizer("test-access-token"))


# ----------------------------------------------------------------------------------------------------
# the transfer section of the configuration


def test_transfer_section_is_validated_and_not_fingerprinted(tmp_path):
    path = beamline_config(tmp_path, sync_level="mtime", data_access=[DEST], bogus=1)
    with pytest.warns(ConfigWarning, match="transfer.bogus"):
        cfg = load(path, check_files=False)
    t = cfg.transfer
    assert (t.source, t.destination, t.destination_path, t.sync_level, t.data_access) == (
        SOURCE, DEST, "/data/laue", "mtime", (DEST,))
    assert (t.verify_checksum, t.retries, t.remove_local) == (True, 3, False)  # defaults
    raw = yaml.safe_load(path.read_text())
    without = copy.deepcopy(raw)
    del without["transfer"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        plain = from_dict(without, check_files=False)
        other = from_dict({**raw, "transfer": {**raw["transfer"], "destination_path": "/elsewhere"}},
                          check_files=False)
    assert plain.transfer is None and "transfer" not in plain.to_dict()
    assert cfg.fingerprint() == plain.fingerprint() == other.fingerprint()  # results do not depend on it
    assert yaml.safe_load(cfg.to_yaml())["transfer"]["destination"] == DEST  # `config show` shows it
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert load(again, check_files=False).transfer == t

    for key, value, message in [("source", "not-a-uuid", "collection UUID"),
                                ("destination_path", "data/laue", "absolute path"),
                                ("sync_level", "fast", "exists, size, mtime, checksum"),
                                ("retries", -1, ">= 0"), ("timeout", 0, "> 0"), ("batch_files", 0, ">= 1"),
                                ("client_id", "x", "client UUID")]:
        bad = copy.deepcopy(raw)
        bad["transfer"][key] = value
        with pytest.raises(ConfigError, match=f"transfer.{key}.*{message}"):
            from_dict(bad, source="beamline.yaml", check_files=False)
    del raw["transfer"]["destination"]
    with pytest.raises(ConfigError, match="transfer.destination: required"):
        from_dict(raw, check_files=False)
    with pytest.raises(ConfigError, match="unknown transfer settings: transfer.speed"):
        transfer_settings({"source": SOURCE, "destination": DEST, "destination_path": "/x", "speed": 1})


# ----------------------------------------------------------------------------------------------------
# Transfers: batches, task states, retries, timeouts, the snapshot


def test_batches_success_and_snapshot(tmp_path, run_dir, rsps):
    """Files wait for a full batch (or batch_seconds); tasks are followed until they succeed."""
    submitted(rsps, "task-one", "task-two")
    task_states(rsps, "task-one", "ACTIVE", "SUCCEEDED")
    task_states(rsps, "task-two", "SUCCEEDED")
    clock, lines = Clock(), []
    t = Transfers(settings(tmp_path), run_dir, client(), report=lines.append, clock=clock, sleep=clock.sleep)
    t.add([run_dir / "point_00000.h5"])
    t.poll(wait=True)
    assert len(rsps.calls) == 0  # one file: not a batch yet, and add() never talks to Globus
    t.add(["point_00001.h5", run_dir / "point_00000.h5"])  # relative to OUT; a queued file only once
    t.poll(wait=True)
    (post,) = requests_to(rsps, "POST", "/transfer")
    doc = json.loads(post.body)
    assert doc["source_endpoint"] == SOURCE and doc["destination_endpoint"] == DEST
    assert doc["sync_level"] == 3 and doc["verify_checksum"] is True and doc["notify_on_succeeded"] is False
    assert doc["deadline"] and doc["label"].startswith("laueflow scan_recon")
    assert doc["submission_id"] == get_response_set("transfer.get_submission_id").metadata["submission_id"]
    assert [(i["source_path"], i["destination_path"]) for i in doc["DATA"]] == [
        (f"/scan_recon/point_0000{k}.h5", f"/data/laue/scan_recon/point_0000{k}.h5") for k in (0, 1)]
    assert post.headers["Authorization"] == "Bearer test-access-token"

    t.add([run_dir / "point_00002.h5", depth_file(run_dir / "depths" / "point_00000" / "depth_0001.h5")])
    t.poll(wait=True)  # task-one still ACTIVE; the new pair is a full batch
    snap = t.snapshot()
    assert snap["tasks"]["task-one"]["state"] == "ACTIVE" and snap["tasks"]["task-one"]["detail"] == "Queued"
    assert snap["files"]["point_00000.h5"] == {"state": "active", "task_id": "task-one", "attempts": 1,
                                               "error": ""}
    assert snap["folders"]["depths/point_00000"]["active"] == 1
    assert t.finish(timeout=60) is True
    snap = t.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert type(snap["files"]["point_00000.h5"]["state"]) is str  # the state's value, not the enum
    assert snap["totals"] == {"files": 4, "queued": 0, "active": 0, "succeeded": 4, "failed": 0, "tasks": 2}
    assert {k: v["state"] for k, v in snap["tasks"].items()} == {"task-one": SUCCEEDED, "task-two": SUCCEEDED}
    assert snap["tasks"]["task-one"]["files_transferred"] == 2 and snap["tasks"]["task-one"]["finished"]
    assert snap["files"]["point_00002.h5"]["task_id"] == "task-two"
    assert snap["folders"]["depths/point_00000"] == {"files": 1, "queued": 0, "active": 0, "succeeded": 1,
                                                     "failed": 0, "attempts": 1, "task_ids": ["task-two"]}
    assert snap["destination_path"] == "/data/laue/scan_recon" and snap["source_path"] == "/scan_recon"
    assert not snap["failed_files"] and not snap["errors"]
    assert all(p.is_file() for p in run_files(run_dir))  # remove_local is off
    assert any("task-one: 2 files submitted" in line for line in lines)
    assert any("task-two: 2 files transferred" in line for line in lines)
    assert t.summary().startswith(f"4 of 4 files transferred to {DEST}:/data/laue/scan_recon in 2 tasks")


def test_hooks_queue_a_finished_point_with_its_depth_files(tmp_path, run_dir, rsps):
    """TransferHooks.on_point_done queues a written point file and the per-depth files io.export wrote
    for it (not a temporary, not a file of someone else); a failed point's file is not sent."""
    submitted(rsps, "task-one")
    grid = np.arange(12) * 1e-3  # 12 depth bins, 0 to 11 um
    r0, r1, c0, c1 = FRAME
    point = write_point_file(run_dir, 1, np.ones((grid.size, r1 - r0, c1 - c0), np.float32), depths_mm=grid)
    depths = export_point(point)
    (depths[0].parent / "out_272544_12.h5.tmp-77").write_bytes(b"partial")
    depth_file(depths[0].parent / "notes.h5")
    clock = Clock()
    t = Transfers(settings(tmp_path, batch_files=1 + grid.size), run_dir, client(), clock=clock,
                  sleep=clock.sleep)
    hooks = TransferHooks(t, say=lambda line: None, note=lambda line: None)
    hooks.on_point_done(PointResult(point=2, status=PointState.FAILED, file=str(run_dir / "point_00002.h5"),
                                    reason="every block failed"))
    hooks.on_point_done(PointResult(point=1, status=PointState.DONE, file=str(point)))
    t.poll(wait=True)
    (post,) = requests_to(rsps, "POST", "/transfer")
    sent = sorted(i["source_path"] for i in json.loads(post.body)["DATA"])
    assert sent == sorted(f"/scan_recon/{p.relative_to(run_dir).as_posix()}" for p in (point, *depths))


def test_lone_file_goes_after_batch_seconds(tmp_path, run_dir, rsps):
    submitted(rsps, "task-one")
    clock = Clock()
    t = Transfers(settings(tmp_path), run_dir, client(), clock=clock, sleep=clock.sleep)
    t.add([run_dir / "point_00000.h5"])
    clock.t += 9
    t.poll(wait=True)
    assert not requests_to(rsps, "POST", "/transfer")
    clock.t += 1
    t.poll(wait=True)
    assert len(requests_to(rsps, "POST", "/transfer")) == 1


def test_failed_task_is_resubmitted_then_reported(tmp_path, run_dir, rsps):
    """A task that fails is resent once (retries: 1); when that fails too, its files are reported failed."""
    fatal = {"code": "PERMISSION_DENIED", "description": "permission denied on /data/laue"}
    submitted(rsps, "task-one", "task-two")
    task_states(rsps, "task-one", "FAILED", fatal=fatal)
    task_states(rsps, "task-two", "FAILED", fatal=fatal)
    clock, lines = Clock(), []
    t = Transfers(settings(tmp_path), run_dir, client(), report=lines.append, clock=clock, sleep=clock.sleep)
    t.add(run_files(run_dir)[:2])
    assert t.finish(timeout=600) is False
    posts = requests_to(rsps, "POST", "/transfer")
    assert len(posts) == 2
    assert [i["source_path"] for i in json.loads(posts[1].body)["DATA"]] == [
        "/scan_recon/point_00000.h5", "/scan_recon/point_00001.h5"]
    snap = t.snapshot()
    assert snap["totals"]["failed"] == 2 and snap["totals"]["succeeded"] == 0
    assert snap["tasks"]["task-one"]["state"] == "FAILED" and snap["tasks"]["task-two"]["attempt"] == 2
    assert snap["files"]["point_00000.h5"] == {"state": "failed", "task_id": "task-two", "attempts": 2,
                                               "error": "PERMISSION_DENIED: permission denied on /data/laue"}
    assert any("task-one: PERMISSION_DENIED" in e for e in snap["errors"])
    assert any("2 files will be sent again (PERMISSION_DENIED" in line for line in lines)
    assert any("2 files failed after 2 attempts: PERMISSION_DENIED" in line for line in lines)
    assert "2 failed" in t.summary()
    assert all(p.is_file() for p in run_files(run_dir))  # nothing removed


def test_timed_out_task_is_cancelled_and_resubmitted(tmp_path, run_dir, rsps):
    submitted(rsps, "task-one", "task-two")
    task_states(rsps, "task-one", "ACTIVE")
    task_states(rsps, "task-two", "SUCCEEDED")
    cancel = get_response_set("transfer.cancel_task").lookup("default").json
    RegisteredResponse(service="transfer", method="POST", path="/v0.10/task/task-one/cancel",
                       json=cancel).add(requests_mock=rsps)
    clock = Clock()
    t = Transfers(settings(tmp_path), run_dir, client(), clock=clock, sleep=clock.sleep)
    t.add(run_files(run_dir)[:2])
    t.poll(wait=True)
    clock.t += 99
    t.poll(wait=True)
    assert not requests_to(rsps, "POST", "/task/task-one/cancel")  # not yet: timeout is 100 s
    clock.t += 1
    t.poll(wait=True)  # cancelled and sent again at once
    assert len(requests_to(rsps, "POST", "/task/task-one/cancel")) == 1
    assert len(requests_to(rsps, "POST", "/transfer")) == 2
    assert t.finish(timeout=60) is True
    snap = t.snapshot()
    assert snap["tasks"]["task-one"]["state"] == "TIMEOUT"
    assert "timed out after 100 s" in snap["tasks"]["task-one"]["detail"]
    assert snap["files"]["point_00001.h5"]["attempts"] == 2
    assert snap["files"]["point_00001.h5"]["state"] == "succeeded"


def test_file_states_keep_the_words_status_json_holds():
    """A file's state is written to status.json (transfers) as these words, which readers match."""
    assert [str(s) for s in TransferState] == ["queued", "submitting", "active", "succeeded", "failed"]


def test_failed_submission_waits_and_is_retried(tmp_path, run_dir, rsps):
    """A submission the service refuses is retried after a pause, counted against the retries."""
    failure = get_response_set("transfer.submit_transfer").lookup("failure")
    failure.add(requests_mock=rsps)
    submitted(rsps, "task-one")
    task_states(rsps, "task-one", "SUCCEEDED")
    clock, lines = Clock(), []
    t = Transfers(settings(tmp_path), run_dir, client(), report=lines.append, clock=clock, sleep=clock.sleep)
    t.add(run_files(run_dir)[:2])
    t.poll(wait=True)
    assert "submission failed: TransferAPIError 400 ClientError.BadRequest.NoTransferItems" in t.snapshot()[
        "errors"][0]
    assert t.snapshot()["totals"]["queued"] == 2
    t.poll(wait=True)
    assert len(requests_to(rsps, "POST", "/transfer")) == 1  # waits 5 s before trying again
    clock.t += 5
    t.poll(wait=True)
    assert len(requests_to(rsps, "POST", "/transfer")) == 2
    assert t.finish(timeout=60) is True


def test_local_files_are_removed_only_after_success(tmp_path, run_dir, rsps):
    submitted(rsps, "task-one", "task-two")
    task_states(rsps, "task-one", "FAILED", fatal={"code": "ENDPOINT_ERROR", "description": "disk offline"})
    task_states(rsps, "task-two", "ACTIVE", "SUCCEEDED")
    clock = Clock()
    t = Transfers(settings(tmp_path, remove_local=True), run_dir, client(), clock=clock, sleep=clock.sleep)
    files = run_files(run_dir)[:2]
    t.add(files)
    t.poll(wait=True)
    t.poll(wait=True)  # task-one failed, task-two submitted
    assert all(p.is_file() for p in files)
    t.poll(wait=True)  # task-two active: nothing removed yet
    assert all(p.is_file() for p in files)
    point_file(files[1])  # rewritten since it was sent: this version never left, so it stays
    assert t.finish(timeout=60) is True
    assert not files[0].exists() and files[1].is_file()
    snap = t.snapshot()
    assert snap["files"]["point_00000.h5"]["removed_locally"] is True
    assert "removed_locally" not in snap["files"]["point_00001.h5"]


def test_a_vanished_file_fails_without_a_task(tmp_path, run_dir, rsps):
    t = Transfers(settings(tmp_path, batch_files=1), run_dir, client())
    gone = run_dir / "point_00000.h5"
    t.add([gone])
    gone.unlink()
    t.poll(wait=True)
    assert not requests_to(rsps, "POST", "/transfer")
    assert t.snapshot()["files"]["point_00000.h5"]["error"] == "the file no longer exists"
    with pytest.raises(ValueError, match="not inside the output folder"):
        t.add([tmp_path / "elsewhere.h5"])


def test_poll_never_waits_for_the_network(tmp_path, run_dir, rsps):
    """While Globus hangs, poll() and add() return at once; the step finishes in the background."""
    release = threading.Event()

    def slow(request):
        release.wait(10)
        body = get_response_set("transfer.submit_transfer").lookup("default").json
        return 200, {}, json.dumps({**body, "task_id": "task-one"})

    rsps.add_callback("POST", f"{TRANSFER_API}/transfer", callback=slow, content_type="application/json")
    t = Transfers(settings(tmp_path), run_dir, client())
    t.add(run_files(run_dir)[:2])
    t0 = time.perf_counter()
    t.poll()
    t.poll()  # the first step is still waiting for the service: nothing more happens
    t.add([run_dir / "point_00002.h5"])
    snap = t.snapshot()
    assert time.perf_counter() - t0 < 1.0
    assert snap["totals"]["queued"] == 3 and not snap["tasks"]
    release.set()
    deadline = time.time() + 10
    while not t.snapshot()["tasks"] and time.time() < deadline:
        time.sleep(0.05)
    assert list(t.snapshot()["tasks"]) == ["task-one"]


def test_output_outside_the_source_root_is_refused(tmp_path, run_dir):
    with pytest.raises(TransferError, match="not inside transfer.source_root"):
        Transfers(settings(tmp_path, source_root=str(tmp_path / "other")), run_dir, client())


# ----------------------------------------------------------------------------------------------------
# authentication


@pytest.fixture
def nobody(tmp_path, monkeypatch):
    """No service-account variables and an empty token cache."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in (ID_VAR, SECRET_VAR, COMPUTE_ID_VAR, COMPUTE_SECRET_VAR):
        monkeypatch.delenv(var, raising=False)


def test_missing_login_says_how_to_log_in(tmp_path, monkeypatch, nobody):
    with pytest.raises(TransferAuthError, match="no Globus client ID.*transfer.client_id"):
        transfer_client(settings(tmp_path))
    native = str(uuid.uuid4())
    with responses.RequestsMock() as mock:  # no request may leave: nothing is registered
        with pytest.raises(TransferAuthError, match=r"not logged in.*laueflow transfer --login"):
            transfer_client(settings(tmp_path, client_id=native))
        assert not mock.calls
    monkeypatch.setenv(SECRET_VAR, "s3cret")
    with pytest.raises(TransferAuthError, match="LAUEFLOW_GLOBUS_CLIENT_ID is not"):
        transfer_client(settings(tmp_path))


@pytest.fixture
def service_account(monkeypatch, rsps):
    """Client credentials in the environment; Globus Auth answers with globus-sdk's test token."""
    monkeypatch.setenv(ID_VAR, str(uuid.uuid4()))
    monkeypatch.setenv(SECRET_VAR, "very-s3cret-value")
    return load_response("auth.oauth2_client_credentials_tokens", requests_mock=rsps)


def test_service_account_from_the_environment(tmp_path, run_dir, rsps, service_account):
    submitted(rsps, "task-one")
    task_states(rsps, "task-one", "SUCCEEDED")
    lines: list[str] = []
    t = Transfers(settings(tmp_path), run_dir, report=lines.append, poll_interval=0)
    t.add(run_files(run_dir))
    assert t.finish(timeout=30) is True
    token = [c.request for c in rsps.calls if c.request.url.startswith("https://auth.globus.org/")]
    body = token[0].body.decode() if isinstance(token[0].body, bytes) else token[0].body
    assert "grant_type=client_credentials" in body and token[0].headers["Authorization"].startswith("Basic ")
    (post,) = requests_to(rsps, "POST", "/transfer")
    assert post.headers["Authorization"] == f"Bearer {service_account.metadata['access_token']}"
    assert "very-s3cret-value" not in json.dumps(t.snapshot()) + "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# a finished run: `laueflow transfer OUT_DIR`


def test_run_files_and_recorded_settings(tmp_path, run_dir):
    depth_file(run_dir / "depths" / "point_00000" / "depth_0000_1.00um.h5")
    depth_file(run_dir / ".blocks" / "point_00001" / "x.h5")
    depth_file(run_dir / "lauelab" / "point_00001.h5")
    depth_file(run_dir / "depths" / ".hidden" / "y.h5")
    (run_dir / "point_00003.h5.tmp-123").write_bytes(b"partial")
    (run_dir / "depths" / "point_00000" / "depth_0001.h5.tmp-9").write_bytes(b"partial")
    (run_dir / "depths" / "point_00000" / "notes.txt").write_text("not a result")
    names = [p.relative_to(run_dir).as_posix() for p in run_files(run_dir)]
    assert names == ["point_00000.h5", "point_00001.h5", "point_00002.h5",
                     "depths/point_00000/depth_0000_1.00um.h5", "lauelab/point_00001.h5"]
    assert run_files(run_dir) == RunFolder(run_dir).result_files()
    assert recorded_settings(run_dir).destination == DEST  # from the configuration file the run used
    cfg_file = tmp_path / "beamline.yaml"
    text = cfg_file.read_text()
    cfg_file.unlink()  # gone: the configuration recorded in the point file is used
    other = tmp_path / "recorded"
    point_file(other / "point_00000.h5", config_file=cfg_file, config_yaml=text)
    assert recorded_settings(other).destination == DEST


def _status(out: Path, state: str, pid: int = 1) -> None:
    (out / "status.json").write_text(json.dumps({"format": "laueflow-status/1", "state": state,
                                                 "host": socket.gethostname(), "pid": pid, "points": {}}))


def test_record_status_respects_a_live_driver(tmp_path, run_dir):
    assert record_status(run_dir, {"x": 1}) is False  # no status file: nothing written
    _status(run_dir, "running", pid=os.getpid())
    assert record_status(run_dir, {"x": 1}) is False
    assert "transfers" not in json.loads((run_dir / "status.json").read_text())
    _status(run_dir, "finished")
    assert record_status(run_dir, {"x": 1}) is True
    status = json.loads((run_dir / "status.json").read_text())
    assert status["transfers"] == {"x": 1} and status["format"] == "laueflow-status/1"


def test_cli_transfer_sends_a_finished_run(tmp_path, run_dir, rsps, service_account):
    depth_file(run_dir / "depths" / "point_00001" / "depth_0000.h5")
    _status(run_dir, "finished")
    submitted(rsps, "task-one")
    task_states(rsps, "task-one", "ACTIVE", "SUCCEEDED")
    r = CliRunner().invoke(main, ["transfer", str(run_dir), "--interval", "0", "--sync-level", "size"])
    assert r.exit_code == 0, r.output
    assert f"sending 4 files from {SOURCE}:/scan_recon to {DEST}:/data/laue/scan_recon" in r.output
    assert "task-one: 4 files transferred" in r.output  # a finished run goes in one task
    assert r.output.strip().splitlines()[-1].startswith("4 of 4 files transferred")
    (post,) = requests_to(rsps, "POST", "/transfer")
    assert json.loads(post.body)["sync_level"] == 1  # --sync-level overrides the configuration's checksum
    transfers = json.loads((run_dir / "status.json").read_text())["transfers"]
    assert transfers["totals"]["succeeded"] == 4 and list(transfers["tasks"]) == ["task-one"]
    assert "very-s3cret-value" not in (run_dir / "status.json").read_text() + r.output


def test_cli_transfer_failure_exits_1(tmp_path, run_dir, rsps, service_account):
    submitted(rsps, "task-one", "task-two", "task-three")
    for task in ("task-one", "task-two", "task-three"):
        task_states(rsps, task, "FAILED", fatal={"code": "FILE_NOT_FOUND", "description": "no such file"})
    r = CliRunner().invoke(main, ["transfer", str(run_dir), "--interval", "0", "--retries", "0",
                                  "--config", str(tmp_path / "beamline.yaml")])
    assert r.exit_code == 1, r.output
    assert "failed after 1 attempts: FILE_NOT_FOUND: no such file" in r.output
    assert "3 failed" in r.output.strip().splitlines()[-1]


def test_cli_transfer_input_errors(tmp_path, run_dir, nobody):
    empty = tmp_path / "empty_recon"
    empty.mkdir()
    runner = CliRunner()
    r = runner.invoke(main, ["transfer", str(empty)])
    assert r.exit_code == 2 and "no transfer settings" in r.output
    r = runner.invoke(main, ["transfer", str(empty), "--source", SOURCE, "--destination", DEST,
                             "--destination-path", "/data", "--source-root", str(tmp_path)])
    assert r.exit_code == 2 and "no finished result files" in r.output
    r = runner.invoke(main, ["transfer", str(run_dir), "--destination", "nope"])
    assert r.exit_code == 2 and "transfer.destination" in r.output and "UUID" in r.output
    r = runner.invoke(main, ["transfer", str(run_dir), "--client-id", str(uuid.uuid4())])
    assert r.exit_code == 2 and "error: not logged in to Globus" in r.output and "--login" in r.output
    r = runner.invoke(main, ["transfer"])
    assert r.exit_code == 2 and "OUT_DIR" in r.output
