"""The binary's command line: the terminal subscriber, and configuration
errors that exit 64 naming the setting."""

import json
import os
import subprocess
from pathlib import Path

import grpc  # noqa: F401  (imported so a missing venv fails here, clearly)
import pytest

from conftest import Proc, free_block, grpcurl, wait_until


def test_terminal_subscriber_prints_messages(dev, barrage_bin):
    sub = subprocess.Popen(
        [str(barrage_bin), "sub", "--url", dev.ws, "--user", "bob", "--room", "subroom", "--count", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        def bob_in_room():
            p = grpcurl("-plaintext", "-d", '{"room_id":"subroom"}', dev.api, "barrage.v1.PushManager/GetRoomInfo", check=False)
            return p.returncode == 0 and "bob" in json.loads(p.stdout).get("members", [])
        wait_until("bob in subroom", bob_in_room)
        grpcurl("-plaintext", "-d", '{"room_id":"subroom","event":"comment","content":"{\\"text\\":\\"hi bob\\"}"}',
                dev.api, "barrage.v1.PushManager/PushToRoom")
        out, err = sub.communicate(timeout=20)
    finally:
        if sub.poll() is None:
            sub.kill()
    assert sub.returncode == 0, err
    assert "[room:subroom] #1 comment" in out, out
    assert '{"text":"hi bob"}' in out, out
    assert "connected to" in err


def run_bin(barrage_bin, *args, env=None):
    full = {k: v for k, v in os.environ.items() if k not in ("ETCD_ENDPOINTS", "CONTROLLER_ADDRESS")}
    full.update(env or {})
    return subprocess.run([str(barrage_bin), *args], capture_output=True, text=True, timeout=30, env=full, stdin=subprocess.DEVNULL)


def test_bad_configuration_exits_64_naming_the_setting(barrage_bin):
    cases = [
        (["controller", "--grpc-port", "99999"], {}, "--grpc-port"),
        (["push-manager"], {}, "ETCD_ENDPOINTS"),
        (["controller"], {"LEASE_TTL_SECS": "0"}, "LEASE_TTL_SECS"),
        (["connect-node", "--controller-address", "nope"], {}, "CONTROLLER_ADDRESS"),
        (["connect-node"], {"CONTROLLER_ADDRESS": "c:1", "SEND_QUEUE": "0"}, "SEND_QUEUE"),
        (["controller"], {"GRPC_PORT": "abc"}, "GRPC_PORT"),
        (["push-manager", "--controller-address", "c:1"], {"PEER_CALLS_IN_FLIGHT": "0"}, "PEER_CALLS_IN_FLIGHT"),
        (["controller"], {"TOKIO_WORKER_THREADS": "zero"}, "TOKIO_WORKER_THREADS"),
        (["push-manager", "--controller-address", "c:1"], {"RUNTIME_FLAVOR": "green-threads"}, "RUNTIME_FLAVOR"),
        (["connect-node"], {"CONTROLLER_ADDRESS": "c:1", "WS_READ_BUFFER_BYTES": "100"}, "WS_READ_BUFFER_BYTES"),
        (["controller"], {"TRANSPARENT_HUGE_PAGES": "always"}, "--transparent-huge-pages"),
        (["controller"], {"HISTORY_MAX_BYTES": "0"}, "HISTORY_MAX_BYTES"),
        (["controller"], {"HISTORY_MAX_STREAMS": "0"}, "HISTORY_MAX_STREAMS"),
        (["connect-node"], {"CONTROLLER_ADDRESS": "c:1", "DIRECT_WRITES": "sometimes"}, "DIRECT_WRITES"),
        (["connect-node"], {"CONTROLLER_ADDRESS": "c:1", "PUBLISH_ROOMS": "live-*", "PUBLISH_API": "pm:50053",
                            "PUBLISH_API_TOKEN": "too-short"}, "PUBLISH_API_TOKEN"),
        (["connect-node"], {"CONTROLLER_ADDRESS": "c:1", "JWT_LEEWAY_SECS": "86400"}, "JWT_LEEWAY_SECS"),
    ]
    for args, env, setting in cases:
        p = run_bin(barrage_bin, *args, env=env)
        assert p.returncode == 64, (args, env, p.returncode, p.stderr)
        assert setting in p.stderr, (args, env, p.stderr)


def test_help_exits_zero(barrage_bin):
    p = run_bin(barrage_bin, "--help")
    assert p.returncode == 0
    for sub in ["controller", "push-manager", "connect-node", "dev", "sub"]:
        assert sub in p.stdout


def thp_enabled(pid) -> str:
    """The process's THP_enabled line of /proc/<pid>/status ("1" or "0")."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("THP_enabled:"):
            return line.split()[1]
    pytest.skip("this kernel does not report THP_enabled")


def test_huge_pages_are_off_unless_asked_for(dev, barrage_bin):
    assert thp_enabled(dev.proc.p.pid) == "0", "the default turns them off"
    ours = thp_enabled(os.getpid())
    base = free_block(2)
    proc = Proc("controller-thp", [str(barrage_bin), "controller", "--node-id", "thp", "--bind-addr", "127.0.0.1",
                                   "--grpc-port", str(base), "--metrics-port", str(base + 1)],
                env={"TRANSPARENT_HUGE_PAGES": "system"})
    try:
        proc.wait_ready(base + 1)
        # `system` leaves the flag as the process inherited it.
        assert thp_enabled(proc.p.pid) == ours, proc.output()
    finally:
        proc.stop()


def runtime_workers(pid):
    """How many of the process's threads are Tokio's runtime workers."""
    names = [(t / "comm").read_text().strip() for t in Path(f"/proc/{pid}/task").iterdir()]
    return sum(1 for n in names if n == "tokio-rt-worker")


@pytest.mark.parametrize("args, env, workers", [
    (["--worker-threads", "3"], {}, 3),
    ([], {"TOKIO_WORKER_THREADS": "1"}, 1),
    (["--worker-threads", "3"], {"RUNTIME_FLAVOR": "current-thread"}, 0),
])
def test_worker_threads_are_what_was_asked(barrage_bin, args, env, workers):
    base = free_block(2)
    proc = Proc("controller-workers", [str(barrage_bin), "controller", "--node-id", "w", "--bind-addr", "127.0.0.1",
                                       "--grpc-port", str(base), "--metrics-port", str(base + 1), *args], env=env)
    try:
        proc.wait_ready(base + 1)
        assert runtime_workers(proc.p.pid) == workers, proc.output()
    finally:
        proc.stop()


def listen_backlog(port):
    """The accept backlog of the socket listening on `port`: `ss` shows it
    as the Send-Q of a listening socket."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10,
                         check=True).stdout.split()
    assert out and out[0] == "LISTEN", out
    return int(out[2])


def test_listeners_ask_for_the_largest_accept_backlog(dev):
    """Every port of a role waits for as many unaccepted connections as the
    kernel allows (net.core.somaxconn), not the 128 of Tokio and std: in a reconnect
    storm a full backlog drops handshakes, and the clients wait seconds
    for retransmissions."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    want = min(somaxconn, 65535)
    for port in (dev.ws_port, dev.api_port, dev.controller_port, dev.node_port, dev.metrics_port):
        assert listen_backlog(port) == want, port
