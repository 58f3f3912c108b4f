"""The demo page of `barrage dev`: the page and the client it loads are
served, and the comment box's publish endpoint validates what it forwards."""

import json
import urllib.error
import urllib.request

from conftest import WsClient, run


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("content-type", ""), r.read().decode()


def post(url, body: bytes):
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_page_and_client_are_served(dev):
    base = f"http://127.0.0.1:{dev.ws_port}"
    for path in ("/", "/demo"):
        status, ctype, body = get(base + path)
        assert status == 200 and ctype.startswith("text/html"), (path, ctype)
        assert 'import { BarrageClient } from "./barrage.js"' in body
    status, ctype, body = get(base + "/barrage.js")
    assert status == 200 and ctype.startswith("text/javascript")
    assert "export class BarrageClient" in body


def test_publish_validates_and_delivers(dev):
    url = f"http://127.0.0.1:{dev.ws_port}/demo/publish"
    status, body = post(url, b"not json")
    assert status == 400 and body.startswith("expected JSON"), (status, body)
    status, body = post(url, json.dumps({"room": "demo-room", "text": "   "}).encode())
    assert status == 400 and body.startswith("text:"), body
    status, body = post(url, json.dumps({"room": "bad room", "text": "hi"}).encode())
    assert status == 400 and "room_id" in body, body

    async def scenario():
        viewer = await WsClient.connect(f"{dev.ws}?user_id=watcher&rooms=demo-room")
        status, body = post(url, json.dumps({"room": "demo-room", "text": "hello", "user": "ann", "color": "#ff0000"}).encode())
        assert status == 200, body
        reply = json.loads(body)
        assert reply["success"] is True and reply["delivered_count"] == 1, reply
        m = await viewer.next_message()
        assert m["event"] == "comment" and m["id"] == reply["message_id"]
        assert m["data"] == {"text": "hello", "user": "ann", "color": "#ff0000"}
        await viewer.close()

    run(scenario())
