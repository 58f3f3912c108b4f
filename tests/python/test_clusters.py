"""Multi-process clusters of the real binary: over a real etcd, and
without etcd through CONTROLLER_ADDRESS."""

import json

import pytest

from conftest import Proc, WsClient, free_port, grpcurl, run, wait_until


class Cluster:
    def __init__(self, barrage_bin):
        self.bin = str(barrage_bin)
        self.procs = []

    def start(self, name, *args, env=None):
        metrics = free_port()
        p = Proc(name, [self.bin, *args, "--metrics-port", str(metrics), "--bind-addr", "127.0.0.1"], env=env)
        self.procs.append(p)
        p.wait_ready(metrics)
        return p

    def stop(self):
        for p in reversed(self.procs):
            p.stop()


def push_room(api, room, content):
    body = json.dumps({"room_id": room, "content": content})
    return json.loads(grpcurl("-plaintext", "-d", body, api, "barrage.v1.PushManager/PushToRoom").stdout)


@pytest.mark.parametrize("flavor", ["multi-thread", "current-thread"])
def test_processes_over_etcd(barrage_bin, etcd, flavor):
    """Every role, its own process, registered in etcd; on either runtime."""
    c = Cluster(barrage_bin)
    env = {"ETCD_ENDPOINTS": etcd, "RUNTIME_FLAVOR": flavor}
    try:
        c.start("controller", "controller", "--node-id", "c1", "--grpc-port", str(free_port()), env=env)
        ws = []
        for i in (1, 2):
            port = free_port()
            ws.append(f"ws://127.0.0.1:{port}/ws")
            c.start(f"node{i}", "connect-node", "--node-id", f"n{i}", "--insecure-user-id",
                    "--ws-port", str(port), "--grpc-port", str(free_port()), env=env)
        api_port = free_port()
        c.start("manager", "push-manager", "--manager-id", "pm1", "--grpc-port", str(api_port), env=env)
        api = f"127.0.0.1:{api_port}"

        async def scenario():
            a = await WsClient.connect(f"{ws[0]}?user_id=a&rooms=r1")
            b = await WsClient.connect(f"{ws[1]}?user_id=b&rooms=r1")
            reply = push_room(api, "r1", '{"n":1}')
            assert reply["success"] and reply["deliveredCount"] == 2, reply
            for cl in (a, b):
                m = await cl.next_message()
                assert m["data"] == {"n": 1}
            info = json.loads(grpcurl("-plaintext", "-d", '{"room_id":"r1"}', api, "barrage.v1.PushManager/GetRoomInfo").stdout)
            assert sorted(n["nodeId"] for n in info["nodes"]) == ["n1", "n2"], info
            await a.close()
            await b.close()

        run(scenario(), timeout=60)
    finally:
        c.stop()


def test_processes_without_etcd(barrage_bin):
    c = Cluster(barrage_bin)
    try:
        ctl_port = free_port()
        c.start("controller", "controller", "--node-id", "c1", "--grpc-port", str(ctl_port))
        env = {"CONTROLLER_ADDRESS": f"127.0.0.1:{ctl_port}"}
        ws_port = free_port()
        c.start("node", "connect-node", "--node-id", "n1", "--insecure-user-id",
                "--ws-port", str(ws_port), "--grpc-port", str(free_port()), env=env)
        api_port = free_port()
        c.start("manager", "push-manager", "--grpc-port", str(api_port), env=env)
        api = f"127.0.0.1:{api_port}"

        async def scenario():
            a = await WsClient.connect(f"ws://127.0.0.1:{ws_port}/ws?user_id=a&rooms=static")
            reply = push_room(api, "static", "plain text")
            assert reply["success"] and reply["deliveredCount"] == 1, reply
            m = await a.next_message()
            assert m["data"] == "plain text"
            await a.close()

        run(scenario(), timeout=60)
    finally:
        c.stop()


def test_a_stalled_node_is_reported_not_hidden(barrage_bin, etcd):
    """A connect-node frozen with SIGSTOP: the push reaches the others, the
    reply says success=false and names the node, the failure is counted."""
    import os
    import signal
    import urllib.request

    c = Cluster(barrage_bin)
    env = {"ETCD_ENDPOINTS": etcd}
    try:
        c.start("controller", "controller", "--node-id", "c1", "--grpc-port", str(free_port()), env=env)
        ws = []
        nodes = []
        for i in (1, 2):
            port = free_port()
            ws.append(f"ws://127.0.0.1:{port}/ws")
            nodes.append(c.start(f"node{i}", "connect-node", "--node-id", f"n{i}", "--insecure-user-id",
                                 "--ws-port", str(port), "--grpc-port", str(free_port()), env=env))
        api_port, pm_metrics = free_port(), None
        pm = c.start("manager", "push-manager", "--manager-id", "pm1", "--grpc-port", str(api_port),
                     "--push-timeout-ms", "500", env=env)
        api = f"127.0.0.1:{api_port}"
        pm_metrics = pm.p.args[pm.p.args.index("--metrics-port") + 1]

        async def scenario():
            a = await WsClient.connect(f"{ws[0]}?user_id=a&rooms=r1")
            b = await WsClient.connect(f"{ws[1]}?user_id=b&rooms=r1")
            os.kill(nodes[1].p.pid, signal.SIGSTOP)
            try:
                reply = push_room(api, "r1", '{"n":1}')
                assert reply.get("success", False) is False, reply
                assert reply["deliveredCount"] == 1, reply
                assert "n2" in reply["message"], reply
                m = await a.next_message()
                assert m["data"] == {"n": 1}
            finally:
                os.kill(nodes[1].p.pid, signal.SIGCONT)
            await a.close()
            await b.close()

        run(scenario(), timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{pm_metrics}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert "push_manager_push_failed_total 1" in metrics, metrics
        assert 'push_manager_node_batch_errors_total{node="n2"} 1' in metrics, metrics
    finally:
        c.stop()
