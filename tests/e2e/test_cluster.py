"""Multi-node, for real: a Ray head and a second node started with `ray start` (token authentication on, as Ray
documents it: RAY_AUTH_MODE=token and the token in a file named by RAY_AUTH_TOKEN_PATH) inside a network namespace
that the test creates with only loopback up, so no traffic leaves the machine's loopback. `ovseg-mine mine
--ray-address` spreads the mask/match actors over both nodes; the second node's raylet is SIGKILLed mid-run, before,
during or after the first shard's commit. The run goes on with the node left (the graph starts again for the shards
not done) or stops within the stall limit saying so, keeping what it committed, and its rerun resumes; either way it
ends with every pair a single-node run gives.

Data: the 16 bundled sample images, each listed 8 times under new ids (128 entries, shards of 16), so that both
actors work; the pairs of every copy must equal those of its image in the single-node `smoke_run`. Skips, with the
reason, where the kernel or the sandbox forbids network namespaces.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from ovseg_mine.shards import PARTIAL_DIR, read_done
from ovseg_mine.verify import read_pairs

from helpers.cli import assert_only_cli_lines, kill_processes
from helpers.runs import assert_same_pairs
from helpers.sources import write_repeated_captions

COPIES = 8
PER_SHARD = 16
HEAD_PORT = 6379  # inside the namespace's own loopback: nothing else listens there
WORKER_NODE_MANAGER_PORT = 6380

#: Run in the namespace's first process: bring loopback up (SIOCSIFFLAGS, no iproute2 needed), say so, wait.
_LOOPBACK_UP = """
import fcntl, signal, socket, struct
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 0x1))
print("ready", flush=True)
signal.pause()
"""


class NetNamespace:
    """A network namespace with only loopback up, held open by its first process; commands join it with nsenter.

    As root: ``unshare -n``. Otherwise: ``unshare -rn`` (a user namespace that maps the caller to root inside,
    which may create network namespaces where unprivileged user namespaces are allowed).
    """

    def __init__(self) -> None:
        missing = [tool for tool in ("unshare", "nsenter") if shutil.which(tool) is None]
        if missing:
            pytest.skip(f"no network namespace: {', '.join(missing)} not installed (util-linux)")
        root = os.geteuid() == 0
        self.holder = subprocess.Popen(
            ["unshare", "-n" if root else "-rn", sys.executable, "-c", _LOOPBACK_UP],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if self.holder.stdout.readline().strip() != "ready":
            reason = self.holder.stderr.read().strip() or f"exit code {self.holder.wait()}"
            pytest.skip(f"the kernel or sandbox forbids network namespaces here: {reason.splitlines()[-1]}")
        self.enter = ["nsenter", "-t", str(self.holder.pid), "-n"] + ([] if root else ["-U", "--preserve-credentials"])
        self.net = os.readlink(f"/proc/{self.holder.pid}/ns/net")
        joined = subprocess.run(self.command(["true"]), capture_output=True, text=True)
        if joined.returncode != 0:
            self.close()
            pytest.skip(f"cannot join the network namespace here: {joined.stderr.strip() or joined.returncode}")

    def command(self, args: list[str]) -> list[str]:
        """``args`` run inside the namespace."""
        return [*self.enter, *args]

    def processes(self) -> list[psutil.Process]:
        """Every process in the namespace but its holder (they are all this test's)."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.pid != self.holder.pid and os.readlink(f"/proc/{process.pid}/ns/net") == self.net:
                    found.append(process)
            except (OSError, psutil.Error):
                pass
        return found

    def close(self) -> None:
        """Kill every process in the namespace (the Ray cluster: no `ray stop`, which would stop other Rays on
        the machine too), then its holder."""
        kill_processes(self.processes())
        self.holder.kill()
        self.holder.wait()


def _raylets(ns: NetNamespace) -> dict[str, psutil.Process]:
    """The cluster's raylets: ``head`` and ``worker`` (started with the worker's node manager port)."""
    raylets = {}
    for process in ns.processes():
        try:
            if process.name() == "raylet":
                worker = f"--node_manager_port={WORKER_NODE_MANAGER_PORT}" in process.cmdline()
                raylets["worker" if worker else "head"] = process
        except psutil.Error:
            pass
    return raylets


def _mask_actors(raylet: psutil.Process) -> list[psutil.Process]:
    found = []
    try:
        for child in raylet.children(recursive=True):
            if "MaskMatchStage" in " ".join(child.cmdline()):
                found.append(child)
    except psutil.Error:
        pass
    return found


@pytest.fixture
def cluster(tmp_path):
    """A two-node Ray cluster (head + second node, 2 logical CPUs each) in its own network namespace; yields the
    namespace and the environment a driver needs (the token)."""
    ns = NetNamespace()
    temp = tempfile.mkdtemp(prefix="ovr", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 bytes
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_health_check_period_ms": "1000",  # a dead node is noticed in seconds, not half a minute
        "RAY_health_check_failure_threshold": "3",
    }
    ray = [str(Path(sys.executable).parent / "ray"), "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "2"]
    ray += ["--object-store-memory", str(150 * 2**20), "--temp-dir", temp, "--disable-usage-stats"]
    try:
        for extra in (
            ["--head", "--port", str(HEAD_PORT), "--include-dashboard", "false"],
            ["--address", f"127.0.0.1:{HEAD_PORT}", "--node-manager-port", str(WORKER_NODE_MANAGER_PORT)],
        ):
            started = subprocess.run(ns.command(ray + extra), env=env, capture_output=True, text=True, timeout=180)
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        assert sorted(_raylets(ns)) == ["head", "worker"]
        yield ns, env
    finally:
        ns.close()
        shutil.rmtree(temp, ignore_errors=True)


def _first_commit_started(out: Path) -> bool:
    """A shard's commit is under way: its ``.tmp`` file is written (the driver pauses there, see ``MOMENTS``)."""
    return any((out / PARTIAL_DIR).glob("*.parquet.tmp"))


def _committed(out: Path) -> bool:
    return (out / "config.json").is_file() and bool(read_done(out))


#: Every image takes a second more on the actors (failpoints reach a joined cluster's workers through the job's
#: runtime environment), so the run lasts long enough for each kill point on a fast machine too.
SLOW_IMAGES = "image:*=sleep(1)"
#: When the second node dies: its actor up and no shard committed; while the driver is inside the first commit (every
#: commit pauses 3 s with its file written and not yet renamed); once a shard is committed, the actor still up.
MOMENTS = {
    "before": (lambda out: not _committed(out), SLOW_IMAGES),
    "during": (_first_commit_started, f"{SLOW_IMAGES},shard.before_rename:*=sleep(3)"),
    "after": (_committed, SLOW_IMAGES),
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", sorted(MOMENTS))
def test_two_nodes_share_the_work_and_losing_one_loses_nothing(cluster, sample, smoke_run, tmp_path, moment):
    ns, env = cluster
    captions, original = write_repeated_captions(sample, tmp_path / "captions.json", COPIES)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "ovseg_mine.cli", "mine", "--captions", str(captions)]
    command += ["--images", str(sample / "images"), "--out", str(out), "--pipeline", "smoke"]
    command += ["--ray-address", f"127.0.0.1:{HEAD_PORT}", "--set", "ray.actors=2"]
    command += ["--set", f"shards.images_per_shard={PER_SHARD}"]
    command += ["--set", "ray.stall_timeout_s=60"]  # a stall after the loss is seen in 60 s (default 90)
    ready, failpoints = MOMENTS[moment]
    driver_env = {**env, "OVSEG_MINE_FAILPOINTS": failpoints}
    proc = subprocess.Popen(
        ns.command(command), env=driver_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    raylets = _raylets(ns)
    nodes_with_actors: set[str] = set()
    started = time.monotonic()
    deadline = started + 600
    # Kill the second node at the moment's point, once both nodes have run a mask/match actor (the pool starts with
    # two: the work is spread) and while the second node's is up (mining under way there).
    while True:
        nodes_with_actors |= {node for node, raylet in raylets.items() if _mask_actors(raylet)}
        if nodes_with_actors == {"head", "worker"} and _mask_actors(raylets["worker"]) and ready(out):
            print(f"second node killed {moment} the first commit, {time.monotonic() - started:.1f} s into the run")
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, (
            f"the kill point ({moment} the first commit, both nodes' actors seen) was not reached: "
            f"actors seen on {sorted(nodes_with_actors)}"
        )
        time.sleep(0.05)
    committed_at_kill = read_done(out) if (out / "config.json").is_file() else {}
    raylets["worker"].send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    if proc.returncode != 0:  # Ray could not go on with the node left: the run says so and a rerun resumes
        assert proc.returncode == 2 and "rerun the same command to resume" in stderr, stderr[-3000:]
        assert set(committed_at_kill) <= set(read_done(out))  # what was committed is kept
        rerun_env = {k: v for k, v in env.items() if k != "OVSEG_MINE_FAILPOINTS"}
        rerun = subprocess.run(ns.command(command), env=rerun_env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        stdout, stderr = rerun.stdout, rerun.stderr
    assert "complete:" in stdout
    assert_only_cli_lines(stdout + stderr)  # the node's death is in RUN/mine.log, not between our lines
    assert "(raylet)" in (out / "mine.log").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == COPIES * 16
    assert manifest["counts"]["rejects_by_stage"] == {}
    reference = read_pairs(smoke_run).to_pylist()
    mined = read_pairs(out).to_pylist()
    for copy in range(1, COPIES + 1):
        pairs = [p for p in mined if p["image_id"] // 10**7 == copy]
        as_single_node = [
            {**p, "image_id": original[p["image_id"]], "pair_id": f"{original[p['image_id']]}:{p['noun']}"}
            for p in pairs
        ]
        assert_same_pairs(reference, as_single_node)
