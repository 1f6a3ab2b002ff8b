"""The globus-compute site: the task graph through Parsl's GlobusComputeExecutor and the Globus Compute SDK's
Executor, with only the Globus service replaced by a local endpoint; and the Polaris endpoint template.

The stand-in (:class:`LocalEndpoint`) is the SDK's own ``Executor`` class with its network-facing methods
replaced: ``submit`` packs the function and its arguments with the SDK's ``ComputeSerializer`` exactly as
function registration and batch submission do and hands them to a separate, freshly spawned Python
process, which unpacks, runs and answers as an endpoint worker does: a serialized result, or the
traceback, which the SDK raises as ``TaskExecutionFailed``.

This module is also the endpoint's code (the spawned process imports it), so it imports laueflow only
inside the tests: an endpoint process can then be started without laueflow.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import h5py
import numpy as np
import pytest
import responses
import yaml
from click.testing import CliRunner

gc = pytest.importorskip("globus_compute_sdk", reason="the globus-compute site needs globus-compute-sdk")
from globus_compute_sdk.errors import TaskExecutionFailed  # noqa: E402
from globus_compute_sdk.sdk.asynchronous.compute_future import ComputeFuture  # noqa: E402
from globus_compute_sdk.serialize import ComputeSerializer  # noqa: E402

SITE = "globus-compute"
ENDPOINT = "2f1d3c4b-5a69-4788-9a0b-1c2d3e4f5a6b"
# laueflow.sites.ENDPOINT_TEMPLATES / "polaris", spelled out (this module imports laueflow only in tests)
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "laueflow" / "sites" / "endpoints" / "polaris"
REGION, BLOCK = 16, 64  # 4 tiles of 8 x 8 pixels per point


class _Absent:
    """An import hook that makes packages look uninstalled (an endpoint set up without them)."""

    def __init__(self, names: Sequence[str]):
        self.names = set(names)

    def find_spec(self, name: str, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def start_endpoint(absent: Sequence[str]) -> None:
    """Set up an endpoint process (runs first in it)."""
    if absent:
        sys.meta_path.insert(0, _Absent(absent))


def run_on_endpoint(task_buffer: str) -> tuple[bool, str]:
    """What an endpoint worker does with a task: unpack function and arguments, run, pack the result."""
    serde = ComputeSerializer()
    try:
        fn, args, kwargs = serde.unpack_and_deserialize(task_buffer)
        return True, serde.serialize(fn(*args, **kwargs))
    except Exception:
        return False, traceback.format_exc()


class _NoService:
    """The SDK client's only part used here: its serializer (no web service, no login)."""

    def __init__(self) -> None:
        self.fx_serializer = ComputeSerializer()


class _NoResultStream:
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


class LocalEndpoint(gc.Executor):
    """globus_compute_sdk.Executor whose tasks go to a local endpoint process instead of the service.

    ``absent`` (a class attribute, set by a test) lists packages the endpoint does not have.
    """

    instances: list[LocalEndpoint] = []
    absent: tuple[str, ...] = ()

    def __init__(self, endpoint_id=None, **kwargs):
        self.built_with = {"endpoint_id": endpoint_id, **kwargs}
        super().__init__(endpoint_id=endpoint_id, client=_NoService(), **kwargs)
        self.pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=start_endpoint,
                                        initargs=(self.absent,))
        self.sent: list[dict] = []
        LocalEndpoint.instances.append(self)

    def submit(self, fn, *args, **kwargs):
        if self._stopped:
            raise RuntimeError(f"{self!r} is shutdown")
        serde = self.serializer
        function_code = serde.pack_buffers([serde.serialize(fn)])  # as Client.register_function sends it
        payload = serde.pack_buffers([serde.serialize(args), serde.serialize(kwargs)])  # as Batch.add does
        fut = ComputeFuture(task_id=str(uuid.uuid4()))
        self.sent.append({"task_id": fut.task_id, "endpoint_id": str(self.endpoint_id),
                          "user_endpoint_config": self.user_endpoint_config})
        remote = self.pool.submit(run_on_endpoint, function_code + payload)
        remote.add_done_callback(partial(self._answer, fut))
        return fut

    def _answer(self, fut: ComputeFuture, remote: Future) -> None:
        ok, data = remote.result()
        if ok:
            fut.set_result(self.serializer.deserialize(data))
        else:
            fut.set_exception(TaskExecutionFailed(data))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.pool.shutdown(wait=True, cancel_futures=cancel_futures)
        super().shutdown(wait=False, cancel_futures=cancel_futures)

    def _get_result_watcher(self):
        return _NoResultStream()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("LAUEFLOW_GLOBUS_COMPUTE_"):
            monkeypatch.delenv(var)


@pytest.fixture
def local_endpoint(monkeypatch):
    """The site builds a LocalEndpoint wherever it would build the SDK's Executor."""
    LocalEndpoint.instances.clear()
    monkeypatch.setattr(gc, "Executor", LocalEndpoint)
    yield LocalEndpoint.instances


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    from conftest import use_tiles  # here, not at the top: the endpoint's process imports this module

    from laueflow.simulate import simulate

    folder = tmp_path_factory.mktemp("sim") / "scan"
    simulate(folder, preset="thin", points=2, region=REGION, seed=5, frames=100)
    use_tiles(folder, BLOCK)
    return folder


def test_dag_runs_on_the_endpoint(scan, tmp_path, local_endpoint):
    """Block tasks go through Parsl's GlobusComputeExecutor and the SDK Executor to the endpoint process
    and their results come back into point files; a task that raises there fails its point with the
    block and the endpoint's error, and the other point goes on."""
    from laueflow import sites
    from laueflow.config import load
    from laueflow.workflow import run

    out = tmp_path / "recon"
    (out / ".blocks").mkdir(parents=True)
    (out / ".blocks" / "point_00000").write_text("in the way")  # the endpoint cannot write point 0's blocks
    parsl_cfg = sites.site_config(SITE, run_dir=str(out / ".runinfo"), endpoint=ENDPOINT, account="MyProj",
                                  queue="demand", nodes=2, user_endpoint_config='{"filesystems": "home:a"}',
                                  retries=0)
    decode = parsl_cfg.executors[0]
    assert decode.label == "decode" and type(decode).__mro__[1].__name__ == "GlobusComputeExecutor"
    cfg = load(scan / "config.yaml")
    result = run(scan, cfg, out, block_pixels=BLOCK, site_config=parsl_cfg)
    failed, done = result.points
    assert result.exit_code == 1

    assert done.status == "done" and done.n_pixels > 0, done.line()
    r0, r1, c0, c1 = cfg.file.frame
    with h5py.File(out / "point_00001.h5") as f:
        rec = f["entry/reconstruction"]
        volume, index = rec["volume"][()], f["entry/diagnostics/index"][()]
        assert volume.shape == (len(cfg.geo.source.depths), r1 - r0, c1 - c0) and volume.max() > 0
        assert index.shape == (done.n_pixels, 2) and f["entry/provenance"].attrs["worker_hosts"]
        np.testing.assert_allclose(f["entry/intensity_vs_depth/intensity"][()], volume.sum(axis=(1, 2)),
                                   rtol=1e-4)

    assert failed.status == "failed" and failed.point == 0
    assert failed.reason.startswith(f"block [{r0}, ") and "FileExistsError" in failed.reason
    assert str(out / ".blocks" / "point_00000") in failed.reason

    (sdk,) = local_endpoint
    template = {"account": "MyProj", "queue": "demand", "nodes": 2, "filesystems": "home:a"}
    assert sdk.built_with["endpoint_id"] == ENDPOINT and sdk.built_with["batch_size"] == 128
    assert sdk.built_with["user_endpoint_config"] == template
    assert len(sdk.sent) == 8  # 2 points x 4 tiles; stitching stayed in the driver
    assert all(s["endpoint_id"] == ENDPOINT and s["user_endpoint_config"] == template for s in sdk.sent)
    assert sdk._stopped  # Parsl shut the SDK executor down at the end of the run


def test_an_endpoint_without_laueflow(scan, tmp_path, local_endpoint, monkeypatch):
    """Tasks the endpoint cannot even unpack fail as one line, with the block and the Globus Compute task."""
    from laueflow import sites
    from laueflow.config import load
    from laueflow.workflow import run

    monkeypatch.setattr(LocalEndpoint, "absent", ("laueflow",))
    out = tmp_path / "recon"
    parsl_cfg = sites.site_config(SITE, run_dir=str(out / ".runinfo"), endpoint=ENDPOINT, retries=0)
    result = run(scan, load(scan / "config.yaml"), out, points=[1], block_pixels=BLOCK, site_config=parsl_cfg)
    (p,) = result.points
    assert result.exit_code == 1 and p.status == "failed" and p.failed_blocks == 4
    assert p.reason.startswith("block [") and "\n" not in p.reason
    assert "RemoteTaskError: ModuleNotFoundError: No module named 'laueflow" in p.reason
    task_ids = {s["task_id"] for s in local_endpoint[0].sent}
    assert any(f"(Globus Compute task {t})" in p.reason for t in task_ids)
    assert local_endpoint[0].built_with["user_endpoint_config"] is None  # no template variables: none sent


def test_site_options_and_errors(tmp_path, monkeypatch, local_endpoint):
    from laueflow import sites
    from laueflow.cli import main

    monkeypatch.setenv("LAUEFLOW_GLOBUS_COMPUTE_ENDPOINT", ENDPOINT)
    monkeypatch.setenv("LAUEFLOW_GLOBUS_COMPUTE_WORKER_INIT", "source /eagle/p/.venv/bin/activate")
    cfg = sites.site_config(SITE, run_dir=str(tmp_path), amqp_port=443, batch_size=16, stitch_threads=3)
    (sdk,) = local_endpoint
    assert sdk.built_with == {"endpoint_id": ENDPOINT, "batch_size": 16, "label": "laueflow",
                              "amqp_port": 443,
                              "user_endpoint_config": {"worker_init": "source /eagle/p/.venv/bin/activate"}}
    assert cfg.retries == 2 and cfg.executors[1].label == "stitch" and cfg.executors[1].max_threads == 3
    sdk.shutdown()
    monkeypatch.delenv("LAUEFLOW_GLOBUS_COMPUTE_ENDPOINT")
    for options, message in [({}, "option 'endpoint' is required.*LAUEFLOW_GLOBUS_COMPUTE_ENDPOINT"),
                             ({"endpoint": "nope"}, "not a Globus Compute endpoint UUID"),
                             ({"endpoint": ENDPOINT, "user_endpoint_config": "{"}, "not valid JSON"),
                             ({"endpoint": ENDPOINT, "user_endpoint_config": "[1]"}, "a JSON object")]:
        with pytest.raises(sites.SiteError, match=message):
            sites.site_config(SITE, **options)
    with pytest.raises(sites.SiteError, match="run without --workers"):
        sites.site_config(SITE, workers=4, endpoint=ENDPOINT)
    r = CliRunner().invoke(main, ["sites", "show", SITE])
    assert r.exit_code == 0 and "endpoint = (required)" in r.output
    assert "LAUEFLOW_GLOBUS_COMPUTE_ACCOUNT" in r.output
    r = CliRunner().invoke(main, ["sites"])
    assert "globus-compute" in r.output


def test_without_a_login_the_site_says_how_to_log_in(tmp_path, monkeypatch):
    """The real SDK Executor, no stored tokens, no network: one clear error before anything runs."""
    from laueflow import sites

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("GLOBUS_COMPUTE_CLIENT_ID", "GLOBUS_COMPUTE_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    with responses.RequestsMock(assert_all_requests_are_fired=False):  # any request fails: nothing registered
        with pytest.raises(sites.SiteError, match="cannot start the Globus Compute client.*log in"):
            sites.site_config(SITE, endpoint=ENDPOINT)


# ----------------------------------------------------------------------------------------------------
# the Polaris endpoint template


def render(variables: dict) -> dict:
    """The template as an endpoint renders it: a sandbox, undefined variables are errors, strings are
    passed as quoted JSON strings; the variables are first checked against the schema."""
    import jinja2
    import jsonschema
    from jinja2.sandbox import SandboxedEnvironment

    schema = json.loads((TEMPLATE_DIR / "user_config_schema.json").read_text())
    jsonschema.validate(variables, schema)
    quoted = {k: json.dumps(v) if isinstance(v, str) else v for k, v in variables.items()}
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined)
    text = env.from_string((TEMPLATE_DIR / "user_config_template.yaml.j2").read_text()).render(**quoted)
    return yaml.safe_load(text)


def test_polaris_endpoint_template():
    init = "module use /soft/modulefiles; module load conda; source /eagle/MyProj/laueflow/.venv/bin/activate"
    conf = render({"account": "MyProj", "worker_init": init, "queue": "prod", "walltime": "03:00:00",
                   "nodes": 4, "max_blocks": 2})
    engine = conf["engine"]
    assert engine["type"] == "GlobusComputeEngine"
    assert engine["max_workers_per_node"] == 4 and engine["available_accelerators"] == 4
    assert engine["address"] == {"type": "address_by_interface", "ifname": "bond0"}
    p = engine["provider"]
    assert p["type"] == "PBSProProvider" and p["select_options"] == "ngpus=4"
    assert (p["account"], p["queue"], p["walltime"], p["nodes_per_block"], p["max_blocks"]) == (
        "MyProj", "prod", "03:00:00", 4, 2)
    assert p["scheduler_options"] == "#PBS -l filesystems=home:eagle"
    assert p["launcher"] == {"type": "MpiExecLauncher", "bind_cmd": "--cpu-bind",
                             "overrides": "--depth=64 --ppn 1"}
    assert p["worker_init"] == f"export XLA_PYTHON_CLIENT_PREALLOCATE=false; export TMPDIR=/tmp; {init}"

    least = render({"account": "A1", "worker_init": 'echo "quoted" && source x', "filesystems": "home:grand"})
    p = least["engine"]["provider"]
    assert (p["queue"], p["walltime"], p["nodes_per_block"], p["max_blocks"]) == ("debug", "01:00:00", 1, 1)
    assert p["scheduler_options"] == "#PBS -l filesystems=home:grand"
    assert p["worker_init"].endswith('; echo "quoted" && source x')

    import jsonschema

    for bad in ({"worker_init": "x"}, {"account": "A", "worker_init": "x", "queue": "fast"},
                {"account": "A", "worker_init": "x", "walltime": "1h"},
                {"account": "A", "worker_init": "x", "n": 1}):
        with pytest.raises(jsonschema.ValidationError):
            render(bad)
    core = yaml.safe_load((TEMPLATE_DIR / "config.yaml").read_text())
    assert "engine" not in core and core["display_name"]  # a template-capable endpoint


def test_polaris_template_builds_the_endpoint_engine(monkeypatch):
    """Where globus-compute-endpoint is installed: the endpoint's own renderer and loader accept it."""
    utils = pytest.importorskip("globus_compute_endpoint.endpoint.config.utils")
    import pwd

    from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity

    parent = utils.get_config(TEMPLATE_DIR)
    schema = utils.load_user_config_schema(TEMPLATE_DIR / "user_config_schema.json")
    who = MappedPosixIdentity(pwd.getpwuid(os.getuid()), [], str(uuid.uuid4()))
    template = TEMPLATE_DIR / "user_config_template.yaml.j2"
    variables = {"account": "MyProj", "worker_init": "source x", "interface": "lo"}
    text = utils.render_config_user_template(parent, template.read_text(), template, who, schema, variables)
    engine = utils.load_config_yaml(text).engine
    provider = engine.executor.provider
    assert type(provider).__name__ == "PBSProProvider" and provider.account == "MyProj"
    assert engine.executor.available_accelerators == ["0", "1", "2", "3"]
