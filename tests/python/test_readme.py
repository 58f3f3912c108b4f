"""Every grpcurl line of the README, run with a real grpcurl against
`barrage dev`, while a WebSocket client in room r1 watches what arrives."""

import asyncio
import json
import re
import shlex

from conftest import ROOT, WsClient, grpcurl, grpcurl_bin, run


def readme_grpcurl_lines(doc="README.md"):
    text = (ROOT / doc).read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += [l.strip() for l in block.splitlines() if l.strip().startswith("grpcurl ")]
    return lines


def test_readme_has_the_walkthrough_lines():
    lines = readme_grpcurl_lines()
    for method in ["list", "describe", "PushToRoom", "PushToUser", "Broadcast", "GetRoomInfo", "GetUserNode", "Health/Check"]:
        assert any(method in l for l in lines), f"README has no grpcurl line for {method}"


def test_every_readme_grpcurl_line_works(dev):
    async def scenario():
        alice = await WsClient.connect(f"{dev.ws}?user_id=alice&rooms=r1")
        outputs = {}
        for line in readme_grpcurl_lines():
            args = shlex.split(line.replace("localhost:50053", dev.api))
            assert args[0] == "grpcurl"
            proc = await asyncio.create_subprocess_exec(
                grpcurl_bin(), *args[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, f"{line}\n{err.decode()}{out.decode()}"
            outputs[line] = out.decode()
            if "PushToRoom" in line:
                reply = json.loads(out)
                assert reply["success"] is True and reply["deliveredCount"] == 1, reply
                m = await alice.next_message()
                assert m["stream"] == "room:r1"
                assert m["event"] == "comment"
                assert m["data"] == {"text": "hello"}
                assert m["id"] == reply["messageId"]
            elif "PushToUser" in line:
                m = await alice.next_message()
                assert (m["stream"], m["data"]) == ("user:alice", {"notice": "you have mail"})
            elif "Broadcast" in line:
                reply = json.loads(out)
                assert reply["totalDelivered"] == 1 and reply["nodeCount"] == 1, reply
                m = await alice.next_message()
                assert m["stream"] == "broadcast"
            elif "GetRoomInfo" in line:
                reply = json.loads(out)
                assert reply["members"] == ["alice"] and reply["connectionCount"] == 1, reply
            elif "GetUserNode" in line:
                reply = json.loads(out)
                assert reply["online"] is True and reply["connectionCount"] == 1, reply
        await alice.close()
        return outputs

    outputs = run(scenario(), timeout=120)
    listed = next(o for l, o in outputs.items() if l.endswith(" list"))
    for svc in ["barrage.v1.PushManager", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]:
        assert svc in listed, listed
    described = next(o for l, o in outputs.items() if "describe" in l)
    assert "rpc PushToRoom" in described
    health = next(o for l, o in outputs.items() if "Health/Check" in l)
    assert "SERVING" in health


def test_invalid_argument_names_the_field(dev):
    p = grpcurl("-plaintext", "-d", '{"room_id":"","content":"x"}', dev.api, "barrage.v1.PushManager/PushToRoom", check=False)
    assert p.returncode != 0
    assert "InvalidArgument" in p.stderr + p.stdout
    assert "room_id: must not be empty" in p.stderr + p.stdout
    p = grpcurl("-plaintext", "-d", '{"room_id":"r1"}', dev.api, "barrage.v1.PushManager/PushToRoom", check=False)
    assert "content: must not be empty" in p.stderr + p.stdout
    p = grpcurl("-plaintext", "-d", '{"room_id":"nobody"}', dev.api, "barrage.v1.PushManager/GetRoomInfo", check=False)
    assert "NotFound" in p.stderr + p.stdout


def test_every_grpcurl_line_of_the_guide_works(dev):
    """docs/grpcurl.md, line by line, against barrage dev."""
    ports = {"localhost:50053": dev.api, "localhost:50052": f"127.0.0.1:{dev.node_port}",
             "localhost:50051": f"127.0.0.1:{dev.controller_port}"}

    async def scenario():
        alice = await WsClient.connect(f"{dev.ws}?user_id=alice&rooms=r1")
        bob = await WsClient.connect(f"{dev.ws}?user_id=bob&rooms=r1")
        outputs = []
        lines = readme_grpcurl_lines("docs/grpcurl.md")
        assert len(lines) >= 14
        for line in lines:
            for k, v in ports.items():
                line = line.replace(k, v)
            args = shlex.split(line)
            proc = await asyncio.create_subprocess_exec(
                grpcurl_bin(), *args[1:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, f"{line}\n{err.decode()}{out.decode()}"
            outputs.append((line, out.decode()))
        first = await alice.next_message()
        assert first["data"] == {"user": "bob", "text": "hi"} and first["event"] == "comment"
        once = await alice.next_message()
        assert once["id"] == "order-42"
        await alice.close()
        await bob.close()
        return outputs

    outputs = run(scenario(), timeout=120)
    text = "\n".join(o for _, o in outputs)
    assert '"nodeId": "connect-node-dev"' in text
    assert '"connections": 2' in text, "Stats on the connect-node"
    assert text.count("SERVING") >= 3
