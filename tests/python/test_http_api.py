"""The push-manager's HTTP/JSON API against `barrage dev`: pushes reach
WebSocket clients, admin reads and room closing, the Java-era aliases,
errors a caller can act on, API tokens, metrics shared with gRPC, and
schemathesis checking the live server against the checked-in OpenAPI
document."""

import json
import subprocess
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, WsClient, Proc, free_block, grpcurl, http_ok, run, wait_until

OPENAPI = ROOT / "services" / "push-manager" / "openapi.json"


def call(method, url, body=None, token=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text.decode(errors="replace")


@pytest.fixture(scope="module")
def api(dev):
    return f"http://127.0.0.1:{dev.metrics_port}"


def test_pushes_reach_websocket_clients(dev, api):
    async def scenario():
        alice = await WsClient.connect(f"{dev.ws}?user_id=alice&rooms=http-room")
        status, r = call("POST", f"{api}/api/v1/push/room/http-room", {"content": {"text": "hi"}, "event": "comment"})
        assert status == 200 and r["success"] and r["delivered_count"] == 1, r
        m = await alice.next_message()
        assert (m["stream"], m["event"], m["data"], m["id"]) == ("room:http-room", "comment", {"text": "hi"}, r["message_id"])

        status, r = call("POST", f"{api}/api/v1/push/user/alice", {"content": "plain text", "message_id": "u-1"})
        assert status == 200 and r["delivered_count"] == 1 and r["message_id"] == "u-1", r
        assert (await alice.next_message())["data"] == "plain text"
        status, again = call("POST", f"{api}/api/v1/push/user/alice", {"content": "plain text", "message_id": "u-1"})
        assert status == 200 and again["duplicate"] is True, again

        status, r = call("POST", f"{api}/api/v1/push/broadcast", {"content": "{\"all\":true}"})
        assert status == 200 and r["total_delivered"] >= 1 and r["node_count"] == 1, r
        assert (await alice.next_message())["data"] == {"all": True}

        # The Java server's path for a room push.
        status, r = call("POST", f"{api}/api/push/broadcast/http-room", {"content": "legacy"})
        assert status == 200 and r["delivered_count"] == 1, r
        assert (await alice.next_message())["data"] == "legacy"
        await alice.close()

    run(scenario())



def test_large_messages_reach_a_standard_websocket_client_whole(dev, api):
    # Over 16 KiB the node sends a message in fragments; a standard
    # client (Python's websockets) hands it over as one message, multibyte
    # characters split across fragments included.
    text = "弾幕€" * 7000  # 63,000 bytes of UTF-8

    async def scenario():
        bob = await WsClient.connect(f"{dev.ws}?user_id=bob&rooms=big-room")
        status, r = call("POST", f"{api}/api/v1/push/room/big-room", {"content": text})
        assert status == 200 and r["delivered_count"] == 1, r
        assert (await bob.next_message())["data"] == text
        await bob.close()

    run(scenario())

def test_admin_reads_and_closing_a_room(dev, api):
    async def scenario():
        bob = await WsClient.connect(f"{dev.ws}?user_id=bob&rooms=stage")
        for path in ("/api/v1/rooms/stage", "/api/push/room/stage"):
            status, r = call("GET", api + path)
            assert status == 200 and r["members"] == ["bob"] and r["connection_count"] == 1, r
        status, r = call("GET", f"{api}/api/push/check/stage")
        assert status == 200 and r["exists"] is True and r["member_count"] == 1, r
        status, r = call("GET", f"{api}/api/v1/users/bob")
        assert status == 200 and r["online"] and r["connection_count"] == 1, r
        for path in ("/api/v1/status", "/api/push/status"):
            status, r = call("GET", api + path)
            assert status == 200 and r["controllers"] == 1 and r["connections"] >= 1, r
            assert [n["reachable"] for n in r["nodes"]] == [True], r

        status, r = call("DELETE", f"{api}/api/v1/rooms/stage")
        assert status == 200 and r["removed_connections"] == 1 and r["node_count"] == 1, r
        left = json.loads(await bob.ws.recv())
        assert left == {"type": "left", "room": "stage"}, left
        wait_until("the room to be empty", lambda: call("GET", f"{api}/api/v1/rooms/stage")[0] == 404)
        status, r = call("POST", f"{api}/api/v1/push/room/stage", {"content": "anyone?"})
        assert status == 200 and r["delivered_count"] == 0, r
        await bob.close()

    run(scenario())
    status, r = call("GET", f"{api}/api/push/check/nobody-here")
    assert status == 200 and r["exists"] is False, r
    status, r = call("GET", f"{api}/api/v1/users/nobody")
    assert status == 404 and r["error"]["code"] == "NOT_FOUND" and r["error"]["field"] == "user_id", r


def test_errors_name_what_is_wrong(api):
    cases = [
        ("POST", "/api/v1/push/room/bad%20room", {"content": "x"}, 400, "room_id"),
        ("POST", "/api/v1/push/room/r1", {}, 400, "content"),
        ("POST", "/api/v1/push/room/r1", {"content": "x", "contnet": "y"}, 400, "contnet"),
        ("POST", "/api/v1/push/room/r1", {"content": "x", "event": "a\u0001b"}, 400, "event"),
        ("POST", "/api/v1/push/user/u1", {"content": "x", "user_ids": ["ok", "not ok"]}, 400, "user_ids"),
        ("POST", "/api/v1/push/broadcast", {"content": "x" * 70000}, 400, "content"),
    ]
    for method, path, body, want, field in cases:
        status, r = call(method, api + path, body)
        assert status == want and r["error"]["field"] == field, (path, body if len(str(body)) < 100 else "…", r)
        assert r["error"]["message"], r
    status, r = call("POST", f"{api}/api/v1/push/room/r1", raw=b"{not json")
    assert status == 400 and r["error"]["code"] == "INVALID_ARGUMENT", r
    status, r = call("POST", f"{api}/api/v1/push/broadcast", raw=json.dumps({"content": "x" * 600_000}).encode())
    assert status == 413 and r["error"]["code"] == "PAYLOAD_TOO_LARGE", r
    status, r = call("GET", f"{api}/api/v1/rooms/never-used")
    assert status == 404 and r["error"]["field"] == "room_id", r


def test_json_content_is_sent_as_written_and_null_fields_are_absent(dev, api):
    """A JSON `content` reaches clients as the caller wrote it (key order,
    integers beyond 64 bits); `null` optional fields count as absent."""
    content = '{"zeta":1,"alpha":123456789012345678901234567890,"nested":{"b":[1.50,2],"a":null}}'

    async def scenario():
        carol = await WsClient.connect(f"{dev.ws}?user_id=carol&rooms=as-written")
        body = ('{"content":%s,"event":null,"message_id":null,"exclude_user_ids":null}' % content).encode()
        status, r = call("POST", f"{api}/api/v1/push/room/as-written", raw=body)
        assert status == 200 and r["delivered_count"] == 1, r
        m = await carol.next_message()
        assert m["event"] == "message" and m["id"] == r["message_id"], m
        assert list(m["data"]) == ["zeta", "alpha", "nested"], m
        assert m["data"]["alpha"] == 123456789012345678901234567890, m
        assert list(m["data"]["nested"]) == ["b", "a"], m

        status, r = call("POST", f"{api}/api/v1/push/user/carol",
                         raw=b'{"content":"plain","event":null,"message_id":null,"user_ids":null}')
        assert status == 200 and r["delivered_count"] == 1, r
        assert (await carol.next_message())["data"] == "plain"
        status, r = call("POST", f"{api}/api/v1/push/broadcast",
                         raw=b'{"content":[3,2,1],"event":null,"message_id":null}')
        assert status == 200, r
        assert (await carol.next_message())["data"] == [3, 2, 1]
        await carol.close()

    run(scenario())
    status, r = call("POST", f"{api}/api/v1/push/room/as-written", raw=b'{"content":null}')
    assert status == 400 and r["error"]["field"] == "content", r
    # JSON, but not text: a lone surrogate.
    status, r = call("POST", f"{api}/api/v1/push/room/as-written", raw=b'{"content":"\\ud800"}')
    assert status == 400 and r["error"]["code"] == "INVALID_ARGUMENT", r


def test_the_readme_curl_line_works(dev, api):
    import re
    import shlex
    text = (ROOT / "README.md").read_text()
    lines = [" ".join(l.replace("\\\n", " ").split())
             for block in re.findall(r"```sh\n(.*?)```", text, re.S)
             for l in [block] if l.strip().startswith("curl ")]
    assert lines, "README has a curl example"

    async def scenario():
        alice = await WsClient.connect(f"{dev.ws}?user_id=alice&rooms=r1")
        for line in lines:
            args = shlex.split(line.replace("localhost:9093", api.removeprefix("http://")))
            p = subprocess.run(args, capture_output=True, text=True, timeout=30)
            reply = json.loads(p.stdout)
            assert reply["success"] and reply["delivered_count"] == 1, reply
            m = await alice.next_message()
            assert (m["event"], m["data"]) == ("comment", {"text": "hello"})
        await alice.close()

    run(scenario())


def test_rest_calls_count_in_the_api_metrics(api):
    def count():
        text = urllib.request.urlopen(f"{api}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith('push_manager_api_requests_total{api="PushToRoom",status="OK"}'):
                return float(line.split()[-1])
        return 0.0

    before = count()
    assert call("POST", f"{api}/api/v1/push/room/metered", {"content": "x"})[0] == 200
    assert count() == before + 1


def test_a_push_whose_message_id_is_still_under_way_is_a_conflict(dev, api):
    """The controller took a push with this message_id (as a push-manager
    that then crashed would leave it) and no result is recorded yet: the
    same push over HTTP answers 409 ABORTED, "still under way", and sends
    nothing."""
    taken = json.loads(grpcurl(
        "-plaintext", "-d",
        json.dumps({"targets": [{"key": "room:conflict"}], "message_id": "busy-1",
                    "body": {"id": "busy-1", "event": "message", "content": "x"},
                    "resend_after_ms": 600000}),
        f"127.0.0.1:{dev.controller_port}", "barrage.v1.Controller/Resolve").stdout)
    assert taken["targets"][0]["key"] == "room:conflict", taken
    status, r = call("POST", f"{api}/api/v1/push/room/conflict", {"content": "x", "message_id": "busy-1"})
    assert status == 409, r
    assert r["error"]["code"] == "ABORTED" and "still under way" in r["error"]["message"], r


def test_the_openapi_document_is_served_as_checked_in(api):
    with urllib.request.urlopen(f"{api}/api/v1/openapi.json", timeout=5) as r:
        assert r.headers["content-type"] == "application/json"
        assert json.loads(r.read()) == json.loads(OPENAPI.read_text())


def test_api_tokens_guard_the_http_api(barrage_bin):
    base = free_block(7)
    metrics = base + 6
    proc = Proc("dev-http-tokens", [str(barrage_bin), "dev", "--ws-port", str(base), "--grpc-port", str(base + 1),
                                    "--controller-grpc-port", str(base + 2), "--node-grpc-port", str(base + 3),
                                    "--metrics-port", str(metrics)],
                env={"API_TOKENS": "svc-chat-7Rk2pW9xQ4mZ8vT1=push:room;ops-4Hn8sL2cV6bY0qE3=*"})
    api = f"http://127.0.0.1:{metrics}"
    try:
        proc.wait_ready(metrics)
        status, r = call("POST", f"{api}/api/v1/push/room/r1", {"content": "x"})
        assert status == 401 and r["error"]["code"] == "UNAUTHENTICATED", r
        status, r = call("POST", f"{api}/api/v1/push/room/r1", {"content": "x"}, token="svc-chat-7Rk2pW9xQ4mZ8vT1")
        assert status == 200, r
        status, r = call("POST", f"{api}/api/v1/push/broadcast", {"content": "x"}, token="svc-chat-7Rk2pW9xQ4mZ8vT1")
        assert status == 403 and "broadcast" in r["error"]["message"], r
        status, r = call("GET", f"{api}/api/v1/status", token="ops-4Hn8sL2cV6bY0qE3")
        assert status == 200, r
        # Health and metrics stay open for probes and scrapers.
        assert http_ok(f"{api}/healthz")
    finally:
        proc.stop()


def test_schemathesis_finds_no_server_error_and_no_schema_violation(api, tmp_path):
    st = ROOT / ".venv" / "bin" / "schemathesis"
    p = subprocess.run(
        [str(st), "run", f"{api}/api/v1/openapi.json", "--url", api,
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
         "--max-examples", "25", "--request-timeout", "10", "--phases", "examples,coverage,fuzzing"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""},
        # Its cache goes to the working directory: keep it out of the tree.
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
