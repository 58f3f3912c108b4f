"""deploy/local/cluster.sh: a real multi-process cluster (etcd, 2
controllers, 2 push-managers, 3 connect-nodes) that starts, serves pushes
through either push-manager to clients on every node, and stops cleanly."""

import json
import os
import subprocess
import tempfile

from conftest import BIN, ROOT, WsClient, free_block, grpcurl, run

SCRIPT = ROOT / "deploy" / "local" / "cluster.sh"


def test_local_cluster_start_push_stop(barrage_bin):
    base = free_block(80)
    state = tempfile.mkdtemp(prefix="barrage-local-")
    env = dict(os.environ, BASE_PORT=str(base), CLUSTER_DIR=state, BARRAGE_BIN=str(BIN))
    for k in ("ETCD_ENDPOINTS", "CONTROLLER_ADDRESS"):
        env.pop(k, None)
    started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        out = started.stdout
        for name in ["controller-1", "controller-2", "push-manager-1", "push-manager-2",
                     "connect-node-1", "connect-node-2", "connect-node-3"]:
            assert name in out, out
        status = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=30)
        assert status.stdout.count("up ") == 8, status.stdout
        ws = [f"ws://127.0.0.1:{base + 49 + i}/ws" for i in (1, 2, 3)]
        apis = [f"127.0.0.1:{base + 29 + i}" for i in (1, 2)]

        async def scenario():
            clients = [await WsClient.connect(f"{u}?user_id=l{i}&rooms=local") for i, u in enumerate(ws)]
            for n, api in enumerate(apis):
                reply = json.loads(grpcurl("-plaintext", "-d", json.dumps({"room_id": "local", "content": f'{{"via":{n}}}'}),
                                           api, "barrage.v1.PushManager/PushToRoom").stdout)
                assert reply["success"] and reply["deliveredCount"] == 3, reply
                for c in clients:
                    assert (await c.next_message())["data"] == {"via": n}
            info = json.loads(grpcurl("-plaintext", "-d", '{"room_id":"local"}', apis[0],
                                      "barrage.v1.PushManager/GetRoomInfo").stdout)
            assert sorted(n["nodeId"] for n in info["nodes"]) == ["connect-node-1", "connect-node-2", "connect-node-3"]
            for c in clients:
                await c.close()

        run(scenario(), timeout=60)
    finally:
        stopped = subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    status = subprocess.run([str(SCRIPT), "status"], env=env, capture_output=True, text=True, timeout=30)
    assert "not running" in status.stdout
