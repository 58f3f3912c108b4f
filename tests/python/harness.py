"""Helpers for failure tests: a push API client built from server
reflection, a subscriber that reconnects with its positions (as the
protocol tells clients to), and the controller ring computed as barrage
computes it."""

import asyncio
import json
import random

import grpc
import websockets
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

MASK = (1 << 64) - 1


class PushApi:
    """PushManager methods, typed at run time through reflection."""

    def __init__(self, addr: str):
        self.channel = grpc.insecure_channel(addr)
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(self.channel))
        svc = pool.FindServiceByName("barrage.v1.PushManager")
        self.calls = {}
        for name in ["PushToRoom", "PushToUser", "Broadcast", "GetRoomInfo"]:
            m = svc.methods_by_name[name]
            req, resp = GetMessageClass(m.input_type), GetMessageClass(m.output_type)
            self.calls[name] = (req, self.channel.unary_unary(
                f"/barrage.v1.PushManager/{name}",
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString))

    def call(self, name, timeout=5, **fields):
        req, fn = self.calls[name]
        return fn(req(**fields), timeout=timeout)

    def try_push(self, name, **fields):
        """The reply, or the gRPC status code when the call failed."""
        try:
            return self.call(name, **fields)
        except grpc.RpcError as e:
            return e.code()

    def close(self):
        self.channel.close()


class ReconnectingSub:
    """Receives every message of its streams, reconnecting with positions."""

    def __init__(self, urls, user, rooms):
        self.urls, self.user, self.rooms = list(urls), user, list(rooms)
        self.positions = {}           # stream -> (epoch, seq)
        self.received = {}            # stream -> [(epoch, seq, data)]
        self.not_recovered = []       # streams the server said it could not recover
        self.closes = []              # close codes seen
        self.connects = 0
        self.stop = asyncio.Event()

    def url(self, i):
        u = f"{self.urls[i % len(self.urls)]}?user_id={self.user}&rooms={','.join(self.rooms)}"
        if self.positions:
            u += "&positions=" + ",".join(f"{s}@{e}:{q}" for s, (e, q) in self.positions.items())
        return u

    async def run(self):
        i = 0
        while not self.stop.is_set():
            try:
                async with websockets.connect(self.url(i), open_timeout=5, close_timeout=1) as ws:
                    first = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert first["type"] == "connected", first
                    self.connects += 1
                    for stream, st in first.get("streams", {}).items():
                        if st.get("recovered") is False:
                            self.not_recovered.append(stream)
                        if st.get("recovered") is not True:
                            self.positions[stream] = (st["epoch"], st["seq"])
                    while not self.stop.is_set():
                        try:
                            raw = await asyncio.wait_for(ws.recv(), 0.2)
                        except asyncio.TimeoutError:
                            continue
                        f = json.loads(raw)
                        if f["type"] != "message":
                            continue
                        self.received.setdefault(f["stream"], []).append((f["epoch"], f["seq"], f["data"]))
                        self.positions[f["stream"]] = (f["epoch"], f["seq"])
            except websockets.ConnectionClosed as e:
                self.closes.append(e.rcvd.code if e.rcvd else 1006)
            except (OSError, asyncio.TimeoutError, websockets.InvalidStatus, websockets.InvalidHandshake):
                self.closes.append(0)
            i += 1
            await asyncio.sleep(0.05 + random.random() * 0.1)

    def datas(self, stream):
        return [d for _, _, d in self.received.get(stream, [])]

    def assert_in_order_once(self, stream):
        seen = self.received.get(stream, [])
        keys = [(e, s) for e, s, _ in seen]
        assert len(keys) == len(set(keys)), f"{self.user} got duplicates on {stream}: {keys}"
        for (e1, s1), (e2, s2) in zip(keys, keys[1:]):
            assert e1 != e2 or s2 == s1 + 1, f"{self.user} saw a gap or disorder on {stream}: {keys}"


def _hash(data: bytes) -> int:
    h = 0xcbf29ce484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001b3) & MASK
    h = ((h ^ (h >> 30)) * 0xbf58476d1ce4e5b9) & MASK
    h = ((h ^ (h >> 27)) * 0x94d049bb133111eb) & MASK
    return h ^ (h >> 31)


def ring_owner(members, key, vnodes=128):
    """The controller owning `key`, as barrage's consistent-hash ring says."""
    points = sorted((_hash(f"{m}#{v}".encode()), m) for m in sorted(members) for v in range(vnodes))
    h = _hash(key.encode())
    for p, m in points:
        if p >= h:
            return m
    return points[0][1]
