"""Failures under load, with real processes over a real etcd: a
connect-node killed with SIGKILL, the controller owning a busy room killed,
etcd restarted, and a rolling restart of every connect-node with SIGTERM.
Every figure is printed; nothing acknowledged may be lost or repeated."""

import asyncio
import base64
import json
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from conftest import Proc, free_port, http_ok, wait_until
from harness import PushApi, ReconnectingSub, ring_owner
from test_clusters import Cluster


def start_node(c, name, node_id, ws_port, grpc_port, env):
    return c.start(name, "connect-node", "--node-id", node_id, "--insecure-user-id",
                   "--ws-port", str(ws_port), "--grpc-port", str(grpc_port), env=env)


def start_nodes(c, count, env):
    """`count` connect-nodes on free ports: their WebSocket URLs and processes."""
    urls, nodes = [], []
    for i in range(count):
        port = free_port()
        urls.append(f"ws://127.0.0.1:{port}/ws")
        nodes.append(start_node(c, f"node{i}", f"n{i}", port, free_port(), env))
    return urls, nodes


def start_manager(c, env, *args):
    """A push-manager on a free port, and a client of its API."""
    api_port = free_port()
    c.start("manager", "push-manager", "--grpc-port", str(api_port), *args, env=env)
    return PushApi(f"127.0.0.1:{api_port}")


async def wait_connected(subs, timeout=20):
    deadline = time.monotonic() + timeout
    while any(s.connects == 0 for s in subs):
        assert time.monotonic() < deadline, "subscribers did not connect"
        await asyncio.sleep(0.05)


async def wait_received(subs, expected, timeout=30):
    """Until each sub has every expected message of each of its streams."""
    deadline = time.monotonic() + timeout
    while True:
        missing = {s.user: {k: len(v) - len(s.datas(k)) for k, v in expected(s).items() if len(s.datas(k)) < len(v)}
                   for s in subs}
        missing = {u: m for u, m in missing.items() if m}
        if not missing:
            return
        assert time.monotonic() < deadline, f"messages still missing: {missing}"
        await asyncio.sleep(0.1)


def start_subs(subs):
    return [asyncio.create_task(s.run()) for s in subs]


async def stop_subs(subs, tasks):
    for s in subs:
        s.stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)


def test_sigkill_of_a_connect_node_loses_nothing(barrage_bin, etcd):
    env = {"ETCD_ENDPOINTS": etcd, "LEASE_TTL_SECS": "3"}
    c = Cluster(barrage_bin)
    try:
        c.start("controller", "controller", "--node-id", "c1", "--grpc-port", str(free_port()), env=env)
        urls, nodes = start_nodes(c, 3, env)
        api = start_manager(c, env, "--push-timeout-ms", "1000")
        subs = [ReconnectingSub(urls[i % 3:] + urls[:i % 3], f"u{i}", [f"r{i % 2}"]) for i in range(6)]
        expected = {}  # stream -> [data]

        async def scenario():
            tasks = start_subs(subs)
            await wait_connected(subs)
            refused = 0
            for k in range(120):
                if k % 3 == 2:
                    stream, reply = f"user:u{k % 6}", await asyncio.to_thread(
                        api.try_push, "PushToUser", user_id=f"u{k % 6}", content=json.dumps({"k": k}))
                else:
                    stream, reply = f"room:r{k % 2}", await asyncio.to_thread(
                        api.try_push, "PushToRoom", room_id=f"r{k % 2}", content=json.dumps({"k": k}))
                if isinstance(reply, grpc.StatusCode):
                    assert reply == grpc.StatusCode.UNAVAILABLE, reply
                    refused += 1
                else:
                    expected.setdefault(stream, []).append({"k": k})
                if k == 40:
                    os.kill(nodes[2].p.pid, signal.SIGKILL)
                await asyncio.sleep(0.02)
            await wait_received(subs, lambda s: {k: v for k, v in expected.items()
                                                 if k in (f"user:{s.user}", f"room:{s.rooms[0]}")})
            await stop_subs(subs, tasks)
            return refused

        refused = asyncio.run(asyncio.wait_for(scenario(), 120))
        moved = [s.user for s in subs if s.connects > 1]
        print(f"pushes kept: {sum(map(len, expected.values()))}, refused: {refused}, reconnected: {moved}")
        assert moved, "the clients of the killed node should have reconnected"
        for s in subs:
            for stream in (f"user:{s.user}", f"room:{s.rooms[0]}"):
                s.assert_in_order_once(stream)
                assert s.datas(stream) == expected.get(stream, []), (s.user, stream)
            assert not s.not_recovered, (s.user, s.not_recovered)
        api.close()
    finally:
        c.stop()


def test_sigkill_of_the_controller_owning_a_busy_room(barrage_bin, etcd):
    env = {"ETCD_ENDPOINTS": etcd, "LEASE_TTL_SECS": "2"}
    c = Cluster(barrage_bin)
    try:
        ctl = {cid: c.start(cid, "controller", "--node-id", cid, "--grpc-port", str(free_port()), env=env)
               for cid in ("c1", "c2")}
        urls, _ = start_nodes(c, 2, env)
        api = start_manager(c, env, "--push-timeout-ms", "1000")
        room = next(f"busy{i}" for i in range(100) if ring_owner({"c1", "c2"}, f"room:busy{i}") == "c1")
        subs = [ReconnectingSub([urls[i % 2]], f"v{i}", [room]) for i in range(4)]
        acked, refused, after_kill = [], 0, 0

        async def scenario():
            nonlocal refused, after_kill
            tasks = start_subs(subs)
            await wait_connected(subs)
            killed = False
            deadline = time.monotonic() + 60
            k = 0
            # Push until a good number went through after the owner died.
            while after_kill < 20:
                assert time.monotonic() < deadline, f"pushes did not resume: {after_kill} after the kill"
                reply = await asyncio.to_thread(api.try_push, "PushToRoom", room_id=room, content=json.dumps({"k": k}))
                if isinstance(reply, grpc.StatusCode):
                    assert reply == grpc.StatusCode.UNAVAILABLE, reply
                    refused += 1
                else:
                    assert reply.success, reply.message
                    acked.append({"k": k})
                    after_kill += killed
                if k == 30:
                    os.kill(ctl["c1"].p.pid, signal.SIGKILL)
                    killed = True
                k += 1
                await asyncio.sleep(0.03)
            await wait_received(subs, lambda s: {f"room:{room}": acked})
            await stop_subs(subs, tasks)

        asyncio.run(asyncio.wait_for(scenario(), 120))
        print(f"room {room}: acknowledged {len(acked)}, refused with UNAVAILABLE during the move {refused}")
        assert refused > 0, "pushes during the move should have been refused, not acknowledged"
        for s in subs:
            s.assert_in_order_once(f"room:{room}")
            assert s.datas(f"room:{room}") == acked
            epochs = {e for e, _, _ in s.received[f"room:{room}"]}
            assert len(epochs) == 2, "the stream got a new epoch on its new owner"
        api.close()
    finally:
        c.stop()


class RestartableEtcd:
    def __init__(self):
        self.client, self.peer = free_port(), free_port()
        self.dir = tempfile.mkdtemp(prefix="barrage-etcd-")
        self.url = f"http://127.0.0.1:{self.client}"
        self.proc = None

    def start(self):
        binary = os.environ.get("ETCD_BIN") or shutil.which("etcd") or "/usr/bin/etcd"
        p = f"http://127.0.0.1:{self.peer}"
        self.proc = Proc("etcd", [binary, "--name", "t", "--data-dir", self.dir,
                                  "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                                  "--listen-peer-urls", p, "--initial-advertise-peer-urls", p,
                                  "--initial-cluster", f"t={p}"])
        wait_until("etcd health", lambda: http_ok(f"{self.url}/health"))

    def kill(self):
        self.proc.p.kill()
        self.proc.p.wait(timeout=10)

    def count(self, prefix):
        b64 = lambda s: base64.b64encode(s.encode()).decode()
        body = json.dumps({"key": b64(prefix), "range_end": b64(prefix[:-1] + chr(ord(prefix[-1]) + 1)),
                           "count_only": True}).encode()
        req = urllib.request.Request(f"{self.url}/v3/kv/range", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=2) as r:
            return int(json.loads(r.read()).get("count", 0))

    def close(self):
        if self.proc:
            self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_etcd_restart_under_load_drops_no_connection(barrage_bin):
    etcd = RestartableEtcd()
    etcd.start()
    env = {"ETCD_ENDPOINTS": etcd.url, "LEASE_TTL_SECS": "3"}
    c = Cluster(barrage_bin)
    try:
        c.start("controller", "controller", "--node-id", "c1", "--grpc-port", str(free_port()), env=env)
        urls, _ = start_nodes(c, 2, env)
        api = start_manager(c, env)
        assert etcd.count("/barrage/nodes/") == 4
        subs = [ReconnectingSub([urls[i]], f"e{i}", ["calm"]) for i in range(2)]
        acked, during_outage = [], 0

        async def scenario():
            nonlocal during_outage
            tasks = start_subs(subs)
            await wait_connected(subs)
            down = False
            for k in range(80):
                reply = await asyncio.to_thread(api.try_push, "PushToRoom", room_id="calm", content=json.dumps({"k": k}))
                assert not isinstance(reply, grpc.StatusCode), f"push {k} failed: {reply}"
                assert reply.success and reply.delivered_count == 2, reply
                acked.append({"k": k})
                during_outage += down
                if k == 20:
                    await asyncio.to_thread(etcd.kill)
                    down = True
                if k == 60:
                    await asyncio.to_thread(etcd.start)
                    down = False
                await asyncio.sleep(0.04)
            await wait_received(subs, lambda s: {"room:calm": acked})
            await stop_subs(subs, tasks)

        asyncio.run(asyncio.wait_for(scenario(), 120))
        wait_until("all four processes registered again", lambda: etcd.count("/barrage/nodes/") == 4, timeout=30)
        print(f"pushes: {len(acked)}, of which during the etcd outage: {during_outage}")
        assert during_outage >= 30
        for s in subs:
            assert s.connects == 1 and not s.closes, f"{s.user} lost its connection: {s.closes}"
            s.assert_in_order_once("room:calm")
            assert s.datas("room:calm") == acked
        api.close()
    finally:
        c.stop()
        etcd.close()


def test_rolling_restart_of_every_connect_node_loses_nothing(barrage_bin, etcd):
    env = {"ETCD_ENDPOINTS": etcd, "LEASE_TTL_SECS": "3"}
    c = Cluster(barrage_bin)
    try:
        c.start("controller", "controller", "--node-id", "c1", "--grpc-port", str(free_port()), env=env)
        ports = [(free_port(), free_port()) for _ in range(2)]
        urls = [f"ws://127.0.0.1:{ws}/ws" for ws, _ in ports]
        nodes = [start_node(c, f"node{i}", f"n{i}", ws, g, env) for i, (ws, g) in enumerate(ports)]
        api = start_manager(c, env, "--push-timeout-ms", "1000")
        subs = [ReconnectingSub(urls[i % 2:] + urls[:i % 2], f"w{i}", ["roll"]) for i in range(4)]
        expected = {}

        def restart(i):
            nodes[i].stop()  # SIGTERM: drain, close with 4000, leave discovery
            assert nodes[i].p.returncode == 0, nodes[i].output()
            ws, g = ports[i]
            nodes[i] = start_node(c, f"node{i}", f"n{i}", ws, g, env)

        async def scenario():
            tasks = start_subs(subs)
            await wait_connected(subs)
            for k in range(150):
                if k % 4 == 3:
                    stream, reply = f"user:w{k % 4}", await asyncio.to_thread(
                        api.try_push, "PushToUser", user_id=f"w{k % 4}", content=json.dumps({"k": k}))
                else:
                    stream, reply = "room:roll", await asyncio.to_thread(
                        api.try_push, "PushToRoom", room_id="roll", content=json.dumps({"k": k}))
                if not isinstance(reply, grpc.StatusCode):
                    expected.setdefault(stream, []).append({"k": k})
                if k in (30, 90):
                    await asyncio.to_thread(restart, 0 if k == 30 else 1)
                await asyncio.sleep(0.02)
            await wait_received(subs, lambda s: {k: v for k, v in expected.items() if k in ("room:roll", f"user:{s.user}")})
            await stop_subs(subs, tasks)

        asyncio.run(asyncio.wait_for(scenario(), 180))
        print(f"pushes kept: {sum(map(len, expected.values()))}; reconnects: {[s.connects for s in subs]}; "
              f"close codes: {[s.closes for s in subs]}")
        for s in subs:
            assert 4000 in s.closes, f"{s.user} should have been asked to reconnect: {s.closes}"
            for stream in ("room:roll", f"user:{s.user}"):
                s.assert_in_order_once(stream)
                assert s.datas(stream) == expected.get(stream, []), (s.user, stream)
            assert not s.not_recovered
        api.close()
    finally:
        c.stop()


def test_adding_a_controller_under_load_moves_keys_and_loses_nothing(barrage_bin, etcd):
    env = {"ETCD_ENDPOINTS": etcd, "LEASE_TTL_SECS": "3"}
    c = Cluster(barrage_bin)
    try:
        c.start("c1", "controller", "--node-id", "c1", "--grpc-port", str(free_port()), env=env)
        urls, _ = start_nodes(c, 2, env)
        api = start_manager(c, env)
        rooms = [f"g{i}" for i in range(8)]
        moving = [r for r in rooms if ring_owner({"c1", "c2"}, f"room:{r}") == "c2"]
        assert moving and len(moving) < len(rooms), "some rooms move to c2, some stay"
        subs = [ReconnectingSub([urls[i % 2]], f"x{i}", [r]) for i, r in enumerate(rooms)]
        acked = {r: [] for r in rooms}
        refused = {r: 0 for r in rooms}

        async def scenario():
            tasks = start_subs(subs)
            await wait_connected(subs)
            # Push round-robin until every room, moved or not, has had pushes
            # acknowledged after c2 joined (the move takes as long as the
            # connect-nodes need to re-send their state, up to the warm-up).
            after_join = {r: 0 for r in rooms}
            deadline = time.monotonic() + 60
            k = 0
            while k < 160 or min(after_join.values()) < 3:
                assert time.monotonic() < deadline, f"pushes did not resume after c2 joined: {after_join}"
                r = rooms[k % len(rooms)]
                reply = await asyncio.to_thread(api.try_push, "PushToRoom", room_id=r, content=json.dumps({"k": k}))
                if isinstance(reply, grpc.StatusCode):
                    assert reply == grpc.StatusCode.UNAVAILABLE, reply
                    refused[r] += 1
                else:
                    assert reply.success, reply.message
                    acked[r].append({"k": k})
                    after_join[r] += k > 40
                if k == 40:
                    await asyncio.to_thread(
                        c.start, "c2", "controller", "--node-id", "c2", "--grpc-port", str(free_port()), env=env)
                k += 1
                await asyncio.sleep(0.02)
            await wait_received(subs, lambda s: {f"room:{s.rooms[0]}": acked[s.rooms[0]]})
            await stop_subs(subs, tasks)

        asyncio.run(asyncio.wait_for(scenario(), 120))
        print(f"moved rooms {moving}; acknowledged {sum(map(len, acked.values()))}; refused {refused}")
        for s in subs:
            r = s.rooms[0]
            s.assert_in_order_once(f"room:{r}")
            assert s.datas(f"room:{r}") == acked[r]
            epochs = {e for e, _, _ in s.received[f"room:{r}"]}
            assert len(epochs) == (2 if r in moving else 1), (r, epochs)
        api.close()
    finally:
        c.stop()
