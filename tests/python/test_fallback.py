"""Server-Sent Events and long-polling on a connect-node (`barrage dev`),
with the WebSocket's guarantees: messages resume after a disconnect from the
positions the server handed out, in order, with no gap and no duplicate."""

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from conftest import WAIT


def push(dev, room, text, kind="room"):
    req = urllib.request.Request(
        f"http://127.0.0.1:{dev.metrics_port}/api/v1/push/{kind}/{room}",
        data=json.dumps({"content": {"text": text}}).encode(),
        headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def push_user(dev, user, text):
    return push(dev, user, text, kind="user")


class Sse:
    """A minimal EventSource: reads `event:`/`id:`/`data:` blocks."""

    def __init__(self, url, last_event_id=None):
        headers = {"accept": "text/event-stream"}
        if last_event_id:
            headers["last-event-id"] = last_event_id
        self.resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=WAIT)
        assert self.resp.headers["content-type"].startswith("text/event-stream")

    def next(self):
        ev = {}
        while True:
            line = self.resp.readline().decode()
            if line == "":
                raise EOFError("stream ended")
            line = line.rstrip("\n")
            if line == "":
                if "data" in ev:
                    return ev
                ev = {}
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            ev[field] = value[1:] if value.startswith(" ") else value

    def next_message(self):
        while True:
            ev = self.next()
            if ev.get("event") == "message":
                return ev, json.loads(ev["data"])

    def close(self):
        self.resp.close()


def test_sse_streams_and_resumes_with_last_event_id(dev):
    url = f"http://127.0.0.1:{dev.ws_port}/sse?user_id=sse-user&rooms=sse-room"
    s = Sse(url)
    first = s.next()
    assert first["event"] == "connected"
    connected = json.loads(first["data"])
    assert connected["user_id"] == "sse-user" and connected["rooms"] == ["sse-room"]
    assert "room:sse-room@" in first["id"]
    for i in (1, 2, 3):
        assert push(dev, "sse-room", f"m{i}")["delivered_count"] == 1
    last_id = None
    for i in (1, 2, 3):
        ev, m = s.next_message()
        assert (m["seq"], m["data"]) == (i, {"text": f"m{i}"}), m
        assert f"room:sse-room@{m['epoch']}:{i}" in ev["id"], ev["id"]
        last_id = ev["id"]
    s.close()

    # Missed while away: replayed after Last-Event-ID, then live again.
    time.sleep(0.2)
    for i in (4, 5):
        push(dev, "sse-room", f"m{i}")
    s = Sse(url, last_event_id=last_id)
    connected = json.loads(s.next()["data"])
    assert connected["streams"]["room:sse-room"]["recovered"] is True, connected
    got = [s.next_message()[1]["seq"] for _ in range(2)]
    assert got == [4, 5]
    push(dev, "sse-room", "m6")
    assert s.next_message()[1]["seq"] == 6
    s.close()


def poll(dev, user, room, since=None, timeout_secs=None):
    url = f"http://127.0.0.1:{dev.ws_port}/poll?user_id={user}&rooms={room}"
    if since is not None:
        url += "&since=" + urllib.parse.quote(since)
    if timeout_secs is not None:
        url += f"&timeout_secs={timeout_secs}"
    start = time.monotonic()
    with urllib.request.urlopen(url, timeout=WAIT + 60) as r:
        return json.loads(r.read()), time.monotonic() - start


def test_long_poll_answers_holds_and_resumes(dev):
    first, took = poll(dev, "poller", "poll-room")
    assert first["messages"] == [] and took < 5
    assert "room:poll-room@" in first["positions"]
    for i in (1, 2):
        push(dev, "poll-room", f"p{i}")
    r, took = poll(dev, "poller", "poll-room", since=first["positions"])
    assert [m["seq"] for m in r["messages"]] == [1, 2] and r["recovered"] is True, r
    assert took < 5

    # Nothing pending: held until a message arrives.
    timer = threading.Timer(0.6, push, args=(dev, "poll-room", "p3"))
    timer.start()
    r2, took = poll(dev, "poller", "poll-room", since=r["positions"])
    timer.join()
    assert [m["data"] for m in r2["messages"]] == [{"text": "p3"}], r2
    assert took >= 0.5, took

    # Nothing at all: an empty answer at the timeout, positions unchanged.
    r3, took = poll(dev, "poller", "poll-room", since=r2["positions"], timeout_secs=1)
    assert r3["messages"] == [] and r3["positions"] == r2["positions"] and 0.9 <= took < 10

    try:
        poll(dev, "poller", "poll-room", since=r2["positions"], timeout_secs=61)
        raise AssertionError("timeout_secs over the maximum was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and "timeout_secs" in e.read().decode()


def test_no_loss_and_no_duplicates_between_polls(dev):
    n = 40
    stop = threading.Event()

    def pusher():
        for i in range(1, n + 1):
            push(dev, "busy-poll", f"b{i}")
            time.sleep(0.01)
        stop.set()

    first, _ = poll(dev, "busy-poller", "busy-poll")
    since = first["positions"]
    t = threading.Thread(target=pusher)
    t.start()
    seqs = []
    deadline = time.monotonic() + 60
    while len(seqs) < n and time.monotonic() < deadline:
        r, _ = poll(dev, "busy-poller", "busy-poll", since=since, timeout_secs=2)
        assert r["recovered"] is True, r
        seqs += [m["seq"] for m in r["messages"] if m["stream"] == "room:busy-poll"]
        since = r["positions"]
    t.join(timeout=30)
    assert seqs == list(range(1, n + 1)), seqs


def user_texts(answer):
    return [m["data"]["text"] for m in answer["messages"] if m["stream"].startswith("user:")]


def test_offline_messages_over_long_poll_wait_for_the_next_poll(dev):
    assert push_user(dev, "lp-away", "while away")["stored_count"] == 1
    first, _ = poll(dev, "lp-away", "lp-room")
    assert user_texts(first) == ["while away"], first
    # That answer may never have arrived: until a poll comes back with its
    # positions, a poll without any is given the message again.
    again, _ = poll(dev, "lp-away", "lp-room")
    assert user_texts(again) == ["while away"], again
    r, took = poll(dev, "lp-away", "lp-room", since=first["positions"], timeout_secs=1)
    assert r["messages"] == [] and took >= 0.9, r
    fresh, _ = poll(dev, "lp-away", "lp-room")
    assert user_texts(fresh) == [], fresh


def test_offline_messages_over_sse_count_as_received_once_sent(dev):
    assert push_user(dev, "sse-away", "while away")["stored_count"] == 1
    url = f"http://127.0.0.1:{dev.ws_port}/sse?user_id=sse-away&rooms=sse-away-room"
    s = Sse(url)
    ev, m = s.next_message()
    assert (m["stream"], m["data"]) == ("user:sse-away", {"text": "while away"}), m
    deadline = time.monotonic() + WAIT
    while True:
        fresh, _ = poll(dev, "sse-away", "sse-away-room")
        if user_texts(fresh) == []:
            break
        assert time.monotonic() < deadline, "the event stream's receipt never reached the controller"
        time.sleep(0.05)
    s.close()


def test_a_poll_that_cannot_resume_answers_at_once(dev):
    # A position of an epoch the stream never had: not recoverable, so the
    # client is told at once to refetch, rather than after the hold.
    push(dev, "lp-gap-room", "one")
    r, took = poll(dev, "lp-gap", "lp-gap-room", since="room:lp-gap-room@424242:1", timeout_secs=20)
    assert r["recovered"] is False and r["messages"] == [], r
    assert took < 10, took
