"""A throwaway one-node Slurm cluster on this machine, for tests of the ``slurm`` site.

``install()`` installs Debian's ``slurmctld``, ``slurmd`` and ``slurm-client`` with apt-get when the
commands are missing (root only; :class:`SlurmUnavailable` says why it could not).  ``start(folder)``
writes ``slurm.conf`` and ``cgroup.conf`` into ``folder`` and runs slurmctld and slurmd in the foreground
as children of this process with that configuration, so that nothing outside ``folder`` is used:

- ``auth/none`` and ``cred/none`` (no munge), ``SlurmUser=root``, free TCP ports on 127.0.0.1 (a Slurm
  the machine may already run keeps its ports and state);
- one node, this host, with the CPUs and memory ``slurmd -C`` reports, in partition ``test``;
- ``proctrack/linuxproc``, ``task/none``, no accounting and no cgroup constraints, which work in a
  container without systemd or writable cgroups; ``ReturnToService=2``, ``MpiDefault=none``;
- state, spool, pid and log files under ``folder`` (the spool in a short /tmp folder where ``folder``'s
  path is too long for slurmd's sockets); finished jobs are recorded in ``folder/jobcomp.log``
  (``jobcomp/filetxt``: ``sacct`` needs a slurmdbd that a test cluster does not have).

``start`` returns once ``sinfo`` shows the node idle.  ``SlurmCluster.stop()`` cancels every job, stops
both daemons and kills whatever still runs with this cluster's ``SLURM_CONF`` in its environment (job
steps, Parsl workers).  The daemons get SIGKILL if the process that started them dies, and ``start``
first kills the job steps that clusters of sessions killed outright left behind (``reap_orphans``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DEBIAN_PACKAGES = ("slurmctld", "slurmd", "slurm-client")
COMMANDS = ("slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "srun", "scancel", "scontrol")
PARTITION = "test"
HEADER = "# a one-node test cluster on this host (written by tests/slurm_cluster.py)"
# the daemons live in /usr/sbin, which a non-login PATH may lack
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here: a reason to skip, not a test failure."""


class ClusterError(RuntimeError):
    """The test cluster did not come up or misbehaved; the message carries the daemons' logs."""


def missing_commands() -> list[str]:
    """The Slurm commands not found on PATH (or /usr/sbin)."""
    return [c for c in COMMANDS if shutil.which(c, path=SEARCH_PATH) is None]


def install(timeout: float = 300.0) -> None:
    """Install the Debian Slurm packages with apt-get if a Slurm command is missing.

    Tries the package lists already present first and runs ``apt-get update`` only when that fails, so a
    machine with cached lists and packages installs quickly.  Raises SlurmUnavailable with the reason
    (not root, no apt-get, apt-get failed: e.g. no network) when the commands cannot be had.
    """
    missing = missing_commands()
    if not missing:
        return
    what = f"Slurm commands {', '.join(missing)} are missing"
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{what} and only root can apt-get install {' '.join(DEBIAN_PACKAGES)}")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{what} and there is no apt-get to install {' '.join(DEBIAN_PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=120"]
    get = [*apt, "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES]

    def attempt(cmd: list[str]) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise SlurmUnavailable(f"{what}; `{' '.join(cmd)}` took over {timeout:.0f} s") from exc

    done = attempt(get)
    if done.returncode != 0:
        done = attempt([*apt, "update"])
        if done.returncode == 0:
            done = attempt(get)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise SlurmUnavailable(f"{what}; `{' '.join(done.args)}` failed (exit {done.returncode}):\n{tail}")
    still = missing_commands()
    if still:
        raise SlurmUnavailable(f"apt-get installed {' '.join(DEBIAN_PACKAGES)} but {', '.join(still)} "
                               "are still not found")


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware() -> dict[str, str]:
    """This host's CPUs, boards, sockets, cores, threads and memory as ``slurmd -C`` reports them
    (the node definition must not claim more than slurmd finds, or the node is drained)."""
    out = subprocess.run([shutil.which("slurmd", path=SEARCH_PATH) or "slurmd", "-C"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "SLURM_CONF": os.devnull})
    fields = dict(re.findall(r"(\w+)=(\S+)", out.stdout.splitlines()[0] if out.stdout else ""))
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    if out.returncode != 0 or not all(k in fields for k in keys):
        raise ClusterError(f"`slurmd -C` did not describe this host (exit {out.returncode}):\n"
                           f"{out.stdout}{out.stderr}")
    return {k: fields[k] for k in keys}


def write_config(folder: Path, node: str, ctld_port: int, slurmd_port: int, spool: Path) -> Path:
    """Write slurm.conf, cgroup.conf and an empty plugstack.conf into ``folder``; returns slurm.conf."""
    for sub in ("state", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    hw = " ".join(f"{k}={v}" for k, v in node_hardware().items())
    (folder / "plugstack.conf").write_text("")  # no site SPANK plugins from /etc/slurm
    (folder / "cgroup.conf").write_text(
        "# no cgroup constraints: the test node may be a container without writable cgroups\n"
        "CgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n"
        "IgnoreSystemd=yes\n")
    conf = folder / "slurm.conf"
    conf.write_text(f"""\
{HEADER}
ClusterName=laueflowtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={spool}
TmpFS={folder}/tmp
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
MailProg=/bin/true
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={folder}/plugstack.conf
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/jobcomp.log
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=120
InactiveLimit=0
KillWait=5
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 {hw} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def die_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` run so that it gets SIGKILL when the process that starts it dies: it cannot outlive a
    session killed outright (where no teardown runs).  util-linux's setpriv sets the signal and execs
    ``cmd`` (no ``preexec_fn``: Python code between fork and exec is unsafe in a threaded process)."""
    setpriv = shutil.which("setpriv", path=SEARCH_PATH)
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd


def _environ(pid: str) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone meanwhile, or not ours to read
        return []


def _environ_has(pid: str, entry: bytes) -> bool:
    return entry in _environ(pid)


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def reap_orphans() -> list[int]:
    """Kill what earlier test clusters left behind and return the process ids.

    A session killed outright runs no teardown: its daemons die with it (``die_with_parent``), its job
    steps do not.  Processes whose SLURM_CONF is a configuration written here (its first line is
    ``HEADER``) that no live slurmctld or slurmd uses any more are such leftovers; clusters of other
    sessions still running are left alone.
    """
    by_conf: dict[str, list[str]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            for entry in _environ(pid):
                if entry.startswith(b"SLURM_CONF="):
                    by_conf.setdefault(entry[len(b"SLURM_CONF="):].decode(errors="replace"), []).append(pid)
    killed = []
    for conf, pids in by_conf.items():
        try:
            ours = Path(conf).read_text().startswith(HEADER)
        except OSError:
            ours = False
        if not ours or any(_comm(p) in ("slurmctld", "slurmd") for p in pids):
            continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
    return killed


def _parent(pid: str) -> str:
    try:  # /proc/PID/stat: pid (comm) state ppid ...; comm may hold spaces and parentheses
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return ""


@dataclass
class SlurmCluster:
    """A running test cluster: its folder, slurm.conf, node name and the environment that reaches it."""

    folder: Path
    conf: Path
    node: str
    env: dict[str, str]
    spool: Path
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def command(self, *args: str, timeout: float = 30.0, check: bool = True) -> str:
        """Run a Slurm client command against this cluster; its stdout (ClusterError with logs on failure)."""
        try:
            done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"`{' '.join(args)}` took over {timeout:.0f} s\n{self.logs()}") from exc
        if check and done.returncode != 0:
            raise ClusterError(f"`{' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()}\n"
                               f"{self.logs()}")
        return done.stdout

    def processes(self) -> list[int]:
        """Ids of the processes other than the daemons (and slurmctld's helper slurmscriptd) that run with
        this cluster's SLURM_CONF: job steps, batch scripts and what they started, clients, and a driver
        submitting to this cluster."""
        entry = f"SLURM_CONF={self.conf}".encode()
        daemons = {str(d.pid) for d in self.daemons.values() if d.poll() is None}
        return [int(p) for p in os.listdir("/proc")
                if p.isdigit() and p not in daemons and int(p) != os.getpid() and _environ_has(p, entry)
                and _parent(p) not in daemons]

    def node_state(self) -> str:
        """The node's state as sinfo prints it (idle, alloc, down*, drain, ...), '' if unknown."""
        return self.command("sinfo", "-h", "-N", "-n", self.node, "-o", "%T", check=False).strip()

    def jobs(self) -> list[str]:
        """Ids of the jobs slurmctld still holds as pending or running."""
        return self.command("squeue", "-h", "-o", "%i", check=False).split()

    def completed_jobs(self) -> list[dict[str, str]]:
        """The jobcomp records of finished jobs (JobId, Name, JobState, NodeList, ...), oldest first."""
        path = self.folder / "jobcomp.log"
        if not path.is_file():
            return []
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in path.read_text().splitlines() if line]

    def logs(self, lines: int = 40) -> str:
        """The last lines of the daemons' logs, for failure messages."""
        parts = []
        for name in ("slurmctld", "slurmd"):
            for suffix in (".log", ".out"):  # the log file, else what the daemon printed before opening it
                path = self.folder / f"{name}{suffix}"
                text = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []
                if text:
                    parts.append(f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
                    break
        return "\n".join(parts) or f"(no daemon logs in {self.folder})"

    def wait_idle(self, timeout: float) -> None:
        """Wait until the node is idle; ClusterError with the logs if a daemon exits or time runs out."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with status {proc.returncode} while the test cluster "
                                       f"was starting\n{self.logs()}")
            state = self.node_state()
            if state == "idle":
                return
            time.sleep(0.5)
        raise ClusterError(f"node {self.node} not idle after {timeout:.0f} s "
                           f"(sinfo: {state or 'no answer'})\n{self.logs()}")

    def cancel_all(self, timeout: float = 30.0) -> list[str]:
        """Cancel every job and wait until none is left; returns the ids that were still queued."""
        ids = self.jobs()
        if ids:
            self.command("scancel", *ids, check=False)
            deadline = time.monotonic() + timeout
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        return ids

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons (SIGTERM, then SIGKILL) and kill every process left that runs
        with this cluster's SLURM_CONF (job steps, batch scripts, Parsl workers and interchange)."""
        if all(p.poll() is None for p in self.daemons.values()):
            with contextlib.suppress(ClusterError):
                self.cancel_all()
        for name in ("slurmd", "slurmctld"):
            proc = self.daemons.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
        for _ in range(3):  # kills can orphan children, which then show up on the next pass
            left = self.processes()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        if not self.spool.is_relative_to(self.folder):
            shutil.rmtree(self.spool, ignore_errors=True)


def start(folder: Path, timeout: float = 120.0) -> SlurmCluster:
    """Write the configuration into ``folder``, start slurmctld and slurmd, wait until the node is idle.

    On failure the daemons are stopped again and ClusterError carries their logs.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    reap_orphans()
    node = socket.gethostname().split(".")[0]
    spool = folder / "spool"
    # slurmd makes a Unix socket SPOOL/<node>_<job>.<step> per job step: a path of at most 107 bytes
    if len(f"{spool}/{node}_4294967290.4294967290") > 107:
        spool = Path(tempfile.mkdtemp(prefix="slurmd-"))
    spool.mkdir(exist_ok=True)
    conf = write_config(folder, node, _free_port(), _free_port(), spool)
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": SEARCH_PATH}
    cluster = SlurmCluster(folder, conf, node, env, spool)
    try:
        for name, args in (("slurmctld", ["-D", "-i", "-f", str(conf)]),
                           ("slurmd", ["-D", "-f", str(conf), "-N", node])):
            exe = shutil.which(name, path=SEARCH_PATH) or name
            with open(folder / f"{name}.out", "wb") as out:
                cluster.daemons[name] = subprocess.Popen(
                    die_with_parent([exe, *args]), env=env, cwd=folder, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True)
            if name == "slurmctld":  # slurmd registers with slurmctld: give it a moment to listen
                deadline = time.monotonic() + timeout
                while cluster.command("scontrol", "ping", check=False).count("UP") == 0:
                    if cluster.daemons[name].poll() is not None or time.monotonic() > deadline:
                        raise ClusterError(f"slurmctld did not answer `scontrol ping`\n{cluster.logs()}")
                    time.sleep(0.5)
        cluster.wait_idle(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def slurm_cluster(folder: Path, timeout: float = 120.0) -> Iterator[SlurmCluster]:
    """Install Slurm if needed, start a test cluster in ``folder``, and always tear it down afterwards."""
    install()
    cluster = start(folder, timeout)
    try:
        yield cluster
    finally:
        cluster.stop()
