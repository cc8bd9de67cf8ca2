"""A Ray worker node that shares no /tmp with the driver, as a node of a real cluster shares no disk.

Plain functions, no pytest. `start_remote_node` runs `ray start --address=HEAD --block` inside its
own mount namespace (`unshare --mount --propagation private`) where a private tmpfs covers /tmp:
what the driver (or pytest's tmp_path) writes under /tmp is invisible there, while the installed
environment stays visible, as on a cluster whose nodes run one image. Paths under /tmp that a node
of such an image would have (the repository and its virtualenv when they live under /tmp, the Ray
auth token file) are bind-mounted back at the same path. The node listens on its own loopback
address (127.0.0.2 by default), so a driver on 127.0.0.1 never attaches to it, and carries a custom
resource that places work on it (`{"imoe_remote": 100}`).

How the private /tmp is made: a tmpfs is first mounted on a staging directory (/mnt, private to the
namespace), the kept paths are bind-mounted into it, and the whole tree is moved over /tmp.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REMOTE_RESOURCE = "imoe_remote"
REMOTE_IP = "127.0.0.2"
_STAGE = "/mnt"  # any directory outside /tmp: the tmpfs is built there, then moved over /tmp


def _free_port() -> int:
    """A port free on every address (some of Ray's agents bind all interfaces)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _under_tmp(path: Path) -> bool:
    return path == Path("/tmp") or Path("/tmp") in path.parents


def kept_paths(extra: list[Path] = ()) -> list[Path]:
    """What stays visible under /tmp inside the namespace: the repository, the virtualenv and the
    Python installation when they live under /tmp, plus `extra` (e.g. the Ray auth token file)."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [repo, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
                  Path(sys.executable).resolve().parent, *[Path(p).resolve() for p in extra]]
    under = sorted({p for p in candidates if _under_tmp(p) and p != Path("/tmp") and p.exists()})
    return [p for p in under if not any(q in p.parents for q in under)]  # an ancestor's bind covers it


def namespace_script(keep: list[Path], command: list[str], binds: dict[str, Path] | None = None) -> str:
    """The shell run by `unshare --mount --propagation private`: private /tmp, kept paths (at their
    own path), `binds` (a path under /tmp inside ← a directory outside), then exec `command`."""
    lines = ["set -eu", f"mount -t tmpfs -o mode=1777,size=4g imoe-remote-tmp {_STAGE}"]
    pairs = [(p, p) for p in keep] + [(Path(inside), Path(source)) for inside, source in (binds or {}).items()]
    for inside, source in pairs:
        target = shlex.quote(f"{_STAGE}/{inside.relative_to('/tmp')}")
        if source.is_dir():
            lines.append(f"mkdir -p {target}")
        else:
            lines.append(f"mkdir -p $(dirname {target}) && touch {target}")
        lines.append(f"mount --bind {shlex.quote(str(source))} {target}")
    lines += [f"mount --move {_STAGE} /tmp", "cd /", "exec " + shlex.join(command)]
    return "\n".join(lines)


@dataclass
class RemoteNode:
    """One `ray start --block` process in its own mount namespace (pid = the `ray start` process)."""

    process: subprocess.Popen
    ip: str
    log_path: Path
    resources: dict[str, float]
    node_id: str | None = None          # set by `wait_alive`
    keep: list[Path] = field(default_factory=list)

    def raylet(self) -> psutil.Process:
        """The node's raylet process (a descendant of `ray start`)."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if child.name() == "raylet":
                return child
        raise RuntimeError(f"no raylet under `ray start` (pid {self.process.pid}): {self.log()}")

    def kill_raylet(self) -> None:
        """SIGKILL the raylet, as a node that dies does: its workers and actors go with it, and Ray
        marks the node dead once the GCS's health checks miss it. `ray start --block` then exits."""
        self.raylet().kill()

    def stop(self, timeout: float = 30.0) -> None:
        """End the node: SIGTERM to its process group (Ray's graceful stop), SIGKILL if it lingers."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:  # anything left in the group (workers that outlived `ray start`)
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def log(self) -> str:
        """The tail of `ray start`'s output and of the raylet's own logs (its session directory is
        kept outside the namespace, beside `log_path`, so a crash can be read afterwards)."""
        parts = [self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""]
        for name in ("raylet.out", "raylet.err"):
            for f in sorted(self.log_path.parent.glob(f"{self.log_path.stem}-ray/session_*/logs/{name}")):
                lines = [l for l in f.read_text(errors="replace").splitlines() if " F " in l or " C " in l or "Check failed" in l
                         or " E " in l][-10:]
                parts += [f"--- {f}", *lines]
        return "\n".join(parts)


def start_remote_node(head_address: str, env: dict[str, str], log_path: Path, *, num_cpus: int = 2,
                      resources: dict[str, float] | None = None, ip: str = REMOTE_IP,
                      object_store_bytes: int = 300 * 1024**2, keep: list[Path] = ()) -> RemoteNode:
    """Start a worker node of the cluster at `head_address` (GCS host:port) in its own mount
    namespace with a private /tmp; `env` is its environment (AWS_*, RAY_AUTH_*, PATH). Not waited for."""
    resources = {REMOTE_RESOURCE: 100} if resources is None else resources
    bin_dir = Path(sys.executable).parent
    token = env.get("RAY_AUTH_TOKEN_PATH")
    keep = kept_paths([*keep, *([Path(token)] if token else [])])
    ray_cmd = [str(bin_dir / "ray"), "start", f"--address={head_address}", "--block",
               f"--node-ip-address={ip}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--resources={json.dumps(resources)}", f"--object-store-memory={object_store_bytes}",
               f"--dashboard-agent-listen-port={_free_port()}",  # the one port Ray does not pick itself
               "--temp-dir=/tmp/ray-remote", "--disable-usage-stats"]
    ray_dir = log_path.parent / f"{log_path.stem}-ray"  # the node's own session files, readable afterwards
    ray_dir.mkdir(parents=True, exist_ok=True)
    node_env = dict(env, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', os.environ.get('PATH', ''))}",
                    RAY_USAGE_STATS_ENABLED="0")
    node_env.pop("RAY_ADDRESS", None)
    cmd = ["unshare", "--mount", "--propagation", "private", "bash", "-c", namespace_script(keep, ray_cmd, {"/tmp/ray-remote": ray_dir})]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=node_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return RemoteNode(process=proc, ip=ip, log_path=log_path, resources=resources, keep=keep)


def _nodes() -> list[dict]:
    import ray

    return ray.nodes()


def wait_alive(node: RemoteNode, known: set[str], timeout: float = 300.0) -> str:
    """Wait (through this driver's `ray.nodes()`) until a node not in `known` with the node's IP and
    resources is alive; record and return its node id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise RuntimeError(f"the remote node exited ({node.process.returncode}): {node.log()}")
        for n in _nodes():
            if (n["Alive"] and n["NodeID"] not in known and n["NodeManagerAddress"] == node.ip
                    and all(n["Resources"].get(k, 0) >= v for k, v in node.resources.items())):
                node.node_id = n["NodeID"]
                return node.node_id
        time.sleep(0.5)
    node.stop()
    raise TimeoutError(f"the remote node did not join within {timeout:.0f}s: {node.log()}")


def wait_dead(node_id: str, timeout: float = 300.0) -> None:
    """Wait until Ray marks the node dead (its resources then leave the cluster's totals)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(n["NodeID"] == node_id and n["Alive"] for n in _nodes()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"Ray still reports node {node_id} alive after {timeout:.0f}s")


class RemoteNodes:
    """The remote worker node of a test module, and its successors: `kill_raylet()` for a fault
    test, `start()` for a fresh node (the old one must be gone), `stop()` at the end."""

    def __init__(self, head_address: str, env: dict[str, str], log_dir: Path, **options):
        self.head_address, self.env, self.log_dir, self.options = head_address, env, Path(log_dir), options
        self.node: RemoteNode | None = None
        self.started: list[RemoteNode] = []

    @property
    def node_id(self) -> str:
        assert self.node is not None and self.node.node_id, "no remote node is running"
        return self.node.node_id

    @property
    def resource(self) -> str:
        return REMOTE_RESOURCE

    def start(self, timeout: float = 300.0) -> str:
        """Start a fresh remote node, wait until Ray reports it alive; returns its node id."""
        known = {n["NodeID"] for n in _nodes()}
        for attempt in range(3):  # a port Ray picked may be taken by another cluster on a shared machine
            log = self.log_dir / f"remote-node-{len(self.started)}.log"
            self.node = start_remote_node(self.head_address, self.env, log, **self.options)
            self.started.append(self.node)
            try:
                return wait_alive(self.node, known, timeout)
            except RuntimeError as e:  # `ray start` exited before the node joined
                if attempt == 2:
                    raise
                print(f"remote node start {attempt + 1} failed, starting another: {e}", file=sys.stderr)

    def kill_raylet(self, wait: bool = True, timeout: float = 300.0) -> str:
        """SIGKILL the current node's raylet (a node lost mid-run); with `wait`, return once Ray
        marks it dead. Returns the dead node's id."""
        node_id = self.node_id
        self.node.kill_raylet()
        if wait:
            wait_dead(node_id, timeout)
        return node_id

    def stop(self, timeout: float = 300.0) -> None:
        """Stop every node started here and wait until Ray marks each dead."""
        for node in self.started:
            node.stop()
        for node in self.started:
            if node.node_id:
                wait_dead(node.node_id, timeout)
        self.node = None
