// Unit tests of the client's own logic: close-code decisions, backoff,
// positions, deduplication, resume URLs, joins. The WebSocket here is a
// scripted stand-in so each case controls exactly what the server "says";
// the end-to-end test (browser.test.js) uses a real cluster and browser.

import { test } from "node:test";
import assert from "node:assert/strict";

import {
  BarrageClient,
  States,
  backoffDelay,
  closeAction,
  formatPositions,
  parsePositions,
} from "../barrage.js";

class ScriptedSocket {
  static all = [];
  constructor(url, protocols) {
    this.url = new URL(url);
    this.protocols = protocols;
    this.sent = [];
    this.closed = null;
    ScriptedSocket.all.push(this);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code, reason) {
    this.closed = { code, reason };
  }
  // Server side of the script.
  frame(obj) {
    this.onmessage?.({ data: JSON.stringify(obj) });
  }
  serverClose(code, reason = "") {
    this.onclose?.({ code, reason });
  }
}

const tick = () => new Promise((r) => setTimeout(r, 0));

/** Resolves once `cond()` holds; fails after `ms`. */
async function until(what, cond, ms = 3000) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function client(options = {}) {
  ScriptedSocket.all = [];
  const c = new BarrageClient({
    url: "ws://node.test/ws",
    WebSocket: ScriptedSocket,
    backoff: { initialMs: 1, maxMs: 4 },
    heartbeatMs: 0,
    ...options,
  });
  c.connect();
  await tick();
  return c;
}

function connected(ws, extra = {}) {
  ws.frame({ type: "connected", conn_id: "n-1", user_id: "alice", node_id: "n", rooms: [], streams: {}, ...extra });
}

function message(stream, seq, id = `m${seq}`, epoch = 7) {
  return { type: "message", stream, id, epoch, seq, event: "message", data: `#${seq}`, timestamp: 0 };
}

test("close codes map to the documented actions", () => {
  assert.equal(closeAction(4000), "reconnect");
  assert.equal(closeAction(4001), "reconnect");
  assert.equal(closeAction(4100), "recover");
  assert.equal(closeAction(4405), "refresh");
  for (const code of [4400, 4401, 4403, 4409, 1009]) assert.equal(closeAction(code), "stop", String(code));
  for (const code of [1000, 1001, 1006, 1011]) assert.equal(closeAction(code), "reconnect", String(code));
});

test("backoff grows exponentially to its cap, with full jitter", () => {
  const opts = { initialMs: 100, maxMs: 1000 };
  assert.equal(backoffDelay(0, opts, () => 0.999999), 99);
  assert.equal(backoffDelay(3, opts, () => 0.999999), 799);
  assert.equal(backoffDelay(10, opts, () => 0.999999), 999);
  assert.equal(backoffDelay(50, opts, () => 0), 0);
  for (let i = 0; i < 100; i++) {
    const d = backoffDelay(4, opts);
    assert.ok(d >= 0 && d < 1000, String(d));
  }
});

test("positions round-trip and reject malformed input", () => {
  const p = { "room:r1": { epoch: 1838642512266569, seq: 42 }, "user:alice": { epoch: 77, seq: 3 } };
  const text = formatPositions(p);
  assert.equal(text, "room:r1@1838642512266569:42,user:alice@77:3");
  assert.deepEqual(parsePositions(text), p);
  assert.deepEqual(parsePositions(""), {});
  for (const bad of ["room:r1", "room:r1@1", "@1:2", "room:r1@x:2"]) {
    assert.throws(() => parsePositions(bad), /expected <stream>@<epoch>:<seq>/, bad);
  }
});

test("messages are delivered once, in order, and positions follow them", async () => {
  const c = await client({ userId: "alice", rooms: ["r1"] });
  const got = [];
  c.on("message", (m) => got.push(m.seq));
  const [ws] = ScriptedSocket.all;
  assert.equal(ws.url.searchParams.get("user_id"), "alice");
  assert.equal(ws.url.searchParams.get("rooms"), "r1");
  assert.deepEqual(ws.protocols, ["barrage"]);
  connected(ws, { rooms: ["r1"] });
  assert.equal(c.state, States.CONNECTED);
  for (const seq of [1, 2, 2, 3, 1]) ws.frame(message("room:r1", seq));
  // Same id on a new seq (a retried push) is dropped too.
  ws.frame(message("room:r1", 4, "m3"));
  assert.deepEqual(got, [1, 2, 3]);
  assert.deepEqual(c.positions["room:r1"], { epoch: 7, seq: 3 });
  // Two pushes in flight at once may arrive swapped: both are delivered.
  ws.frame(message("room:r1", 6));
  ws.frame(message("room:r1", 5));
  assert.deepEqual(got, [1, 2, 3, 6, 5]);
  assert.deepEqual(c.positions["room:r1"], { epoch: 7, seq: 6 });
  c.close();
});

test("after a drop it reconnects with positions and reports recovery", async () => {
  const c = await client({ token: "jwt-1", rooms: ["r1"] });
  const states = [];
  const sessions = [];
  c.on("state", (s) => states.push(s.state));
  c.on("connected", (s) => sessions.push(s.recovered));
  const [first] = ScriptedSocket.all;
  assert.deepEqual(first.protocols, ["barrage", "bearer.jwt-1"]);
  assert.equal(first.url.searchParams.get("token"), null, "the token is not put in the URL");
  connected(first, { rooms: ["r1"], streams: { "room:r1": { epoch: 7, seq: 0 } } });
  first.frame(message("room:r1", 1));
  first.frame(message("room:r1", 2));
  first.serverClose(4000, "server shutting down, reconnect");
  await new Promise((r) => setTimeout(r, 20));
  const second = ScriptedSocket.all[1];
  assert.ok(second, "reconnected");
  assert.equal(second.url.searchParams.get("positions"), "room:r1@7:2");
  assert.equal(second.url.searchParams.get("rooms"), "r1");
  connected(second, { rooms: ["r1"], streams: { "room:r1": { epoch: 7, seq: 3, recovered: true } } });
  assert.deepEqual(states, [States.CONNECTED, States.RECONNECTING, States.CONNECTED]);
  assert.deepEqual(sessions, [true, true]);

  // A stream that cannot be resumed: reported, and positions restart.
  second.serverClose(1006, "");
  await new Promise((r) => setTimeout(r, 20));
  const third = ScriptedSocket.all[2];
  connected(third, { rooms: ["r1"], streams: { "room:r1": { epoch: 9, seq: 40, recovered: false } } });
  assert.deepEqual(sessions, [true, true, false]);
  assert.deepEqual(c.positions["room:r1"], { epoch: 9, seq: 40 });
  c.close();
});

test("auth failures and kicks stop reconnecting", async () => {
  for (const code of [4401, 4403, 4409, 4400]) {
    const c = await client({ token: "bad" });
    const errors = [];
    c.on("error", (e) => errors.push(e.code));
    ScriptedSocket.all[0].serverClose(code, "nope");
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(ScriptedSocket.all.length, 1, `no reconnect after ${code}`);
    assert.equal(c.state, States.CLOSED);
    assert.deepEqual(errors, [String(code)]);
  }
});

test("an expired token is renewed through getToken before reconnecting", async () => {
  let n = 0;
  const c = await client({ getToken: async () => `jwt-${++n}` });
  connected(ScriptedSocket.all[0]);
  ScriptedSocket.all[0].serverClose(4405, "token expired");
  await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(ScriptedSocket.all[1].protocols, ["barrage", "bearer.jwt-2"]);
  c.close();

  const fixed = await client({ token: "jwt" });
  connected(ScriptedSocket.all[0]);
  ScriptedSocket.all[0].serverClose(4405, "token expired");
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(ScriptedSocket.all.length, 1, "a fixed token cannot be renewed");
  assert.equal(fixed.state, States.CLOSED);
});

test("joins made while connecting are sent once connected; leave forgets the room", async () => {
  const c = await client({ userId: "alice" });
  c.join("r2");
  const [ws] = ScriptedSocket.all;
  assert.deepEqual(ws.sent, []);
  connected(ws);
  assert.deepEqual(ws.sent, [{ type: "join", room: "r2" }]);
  ws.frame({ type: "joined", room: "r2" });
  ws.frame(message("room:r2", 1));
  c.leave("r2");
  assert.deepEqual(ws.sent.at(-1), { type: "leave", room: "r2" });
  assert.equal(c.positions["room:r2"], undefined);
  assert.ok(!c.rooms.has("r2"));
  c.close();
  assert.deepEqual(ws.closed, { code: 1000, reason: "bye" });
});

test("a room joined live is resumed from the position joined gives", async () => {
  const c = await client({ userId: "alice" });
  const [ws] = ScriptedSocket.all;
  connected(ws);
  c.join("quiet");
  ws.frame({ type: "joined", room: "quiet", epoch: 7, seq: 4 });
  assert.deepEqual(c.positions["room:quiet"], { epoch: 7, seq: 4 });
  // A message that arrived before `joined` and is past it keeps its place.
  c.join("busy");
  ws.frame(message("room:busy", 9, "m9", 1));
  ws.frame({ type: "joined", room: "busy", epoch: 1, seq: 8 });
  assert.deepEqual(c.positions["room:busy"], { epoch: 1, seq: 9 });
  // So does one of a newer epoch than the one `joined` read.
  c.join("moved");
  ws.frame(message("room:moved", 1, "n1", 2));
  ws.frame({ type: "joined", room: "moved", epoch: 1, seq: 5 });
  assert.deepEqual(c.positions["room:moved"], { epoch: 2, seq: 1 });
  ws.serverClose(1006);
  await until("a new socket", () => ScriptedSocket.all.length >= 2);
  const resumed = parsePositions(ScriptedSocket.all[1].url.searchParams.get("positions"));
  assert.deepEqual(resumed["room:quiet"], { epoch: 7, seq: 4 });
  assert.deepEqual(resumed["room:busy"], { epoch: 1, seq: 9 });
  c.close();
});

test("a join the server refuses for good is forgotten, so reconnects are not refused", async () => {
  const c = await client({ userId: "alice", rooms: ["lobby"] });
  const errors = [];
  c.on("error", (e) => errors.push(e));
  const [ws] = ScriptedSocket.all;
  connected(ws, { rooms: ["lobby"] });
  c.join("vip");
  c.join("r2");
  assert.deepEqual(ws.sent, [{ type: "join", room: "vip" }, { type: "join", room: "r2" }]);
  ws.frame({ type: "error", code: "forbidden", message: "the token does not allow joining vip", room: "vip" });
  // A refusal that may pass on a retry keeps the room.
  ws.frame({ type: "error", code: "unavailable", message: "try again", room: "r2" });
  assert.deepEqual(errors.map((e) => [e.code, e.room]), [["forbidden", "vip"], ["unavailable", "r2"]]);
  assert.deepEqual([...c.rooms], ["lobby", "r2"]);
  ws.serverClose(4000, "node shutting down");
  await until("a reconnect", () => ScriptedSocket.all.length === 2);
  assert.equal(ScriptedSocket.all[1].url.searchParams.get("rooms"), "lobby,r2", "the forbidden room is not asked for");
  // Errors without a room (older servers, other frames) leave the rooms alone.
  connected(ScriptedSocket.all[1], { rooms: ["lobby", "r2"] });
  ScriptedSocket.all[1].frame({ type: "error", code: "forbidden", message: "the new token is for bob" });
  assert.deepEqual([...c.rooms], ["lobby", "r2"]);
  c.close();
});

test("a silent connection is detected by the heartbeat and replaced", async () => {
  const c = await client({ userId: "alice", heartbeatMs: 300 });
  const [ws] = ScriptedSocket.all;
  connected(ws);
  await until("a ping when idle", () => ws.sent.some((f) => f.type === "ping"));
  assert.equal(ws.closed, null, "a ping alone does not close");
  await until("the silent socket to be closed", () => ws.closed !== null);
  assert.equal(ws.closed.code, 4001);
  await until("a new socket", () => ScriptedSocket.all.length >= 2);
  c.close();
});

test("a failing handler does not break delivery", async () => {
  const c = await client({ userId: "alice" });
  const got = [];
  c.on("message", () => {
    throw new Error("app bug");
  });
  c.on("message", (m) => got.push(m.seq));
  const [ws] = ScriptedSocket.all;
  connected(ws);
  const reported = [];
  const original = console.error;
  console.error = (...args) => reported.push(args.join(" "));
  try {
    ws.frame(message("user:alice", 1));
    ws.frame(message("user:alice", 2));
  } finally {
    console.error = original;
  }
  assert.deepEqual(got, [1, 2]);
  assert.equal(reported.length, 2);
  assert.match(reported[0], /"message" handler failed.*app bug/);
  c.close();
});

class ScriptedEventSource {
  static all = [];
  constructor(url) {
    this.url = new URL(url);
    this.listeners = {};
    this.closed = false;
    ScriptedEventSource.all.push(this);
  }
  addEventListener(type, fn) {
    (this.listeners[type] ??= []).push(fn);
  }
  close() {
    this.closed = true;
  }
  // Server side of the script.
  event(type, obj) {
    for (const fn of this.listeners[type] ?? []) fn({ data: JSON.stringify(obj) });
  }
}

test("two failed WebSocket attempts fall back to Server-Sent Events", async () => {
  ScriptedEventSource.all = [];
  const c = await client({ userId: "alice", rooms: ["r1"], EventSource: ScriptedEventSource, fetch: async () => { throw new Error("unused"); } });
  const moves = [];
  c.on("transport", (t) => moves.push(t.transport));
  ScriptedSocket.all[0].serverClose(1006);
  await until("a second WebSocket", () => ScriptedSocket.all.length === 2);
  ScriptedSocket.all[1].serverClose(1006);
  await until("an event source", () => ScriptedEventSource.all.length === 1);
  assert.deepEqual(moves, ["sse"]);
  const es = ScriptedEventSource.all[0];
  assert.equal(es.url.pathname, "/sse");
  assert.equal(es.url.protocol, "http:");
  assert.equal(es.url.searchParams.get("rooms"), "r1");
  const sessions = [];
  c.on("connected", (s) => sessions.push(s.transport));
  es.event("connected", { type: "connected", conn_id: "n-2", user_id: "alice", node_id: "n", rooms: ["r1"], streams: {} });
  assert.deepEqual(sessions, ["sse"]);
  const got = [];
  c.on("message", (m) => got.push(m.seq));
  es.event("message", message("room:r1", 1));
  es.event("message", message("room:r1", 1));
  assert.deepEqual(got, [1]);
  // A server close asking to recover reconnects on the same transport, with positions.
  es.event("close", { code: 4100, reason: "slow consumer" });
  await until("a new event source", () => ScriptedEventSource.all.length === 2);
  assert.equal(ScriptedEventSource.all[1].url.searchParams.get("positions"), "room:r1@7:1");
  c.close();
  assert.equal(c.state, States.CLOSED);
  assert.ok(ScriptedEventSource.all[1].closed);
});

test("long-polling carries positions from poll to poll and honours auth failures", async () => {
  const calls = [];
  const answers = [
    { status: 200, body: { messages: [], user_id: "bob", node_id: "n", rooms: ["r1"], streams: { "room:r1": { epoch: 7, seq: 0 } }, recovered: true, positions: "room:r1@7:0" } },
    { status: 200, body: { messages: [message("room:r1", 1), message("room:r1", 2)], user_id: "bob", node_id: "n", rooms: ["r1"], streams: { "room:r1": { epoch: 7, seq: 2, recovered: true } }, recovered: true, positions: "room:r1@7:2" } },
    { status: 401, text: "token expired" },
  ];
  const fakeFetch = async (url, init) => {
    calls.push({ url: new URL(url), init });
    const a = answers.shift();
    if (!a) return new Promise(() => {});
    return { ok: a.status === 200, status: a.status, json: async () => a.body, text: async () => a.text ?? "" };
  };
  ScriptedSocket.all = [];
  const c = new BarrageClient({ url: "wss://node.test/ws", token: "jwt", rooms: ["r1"], transports: ["poll"], fetch: fakeFetch, backoff: { initialMs: 1, maxMs: 2 } });
  const got = [];
  const errors = [];
  c.on("message", (m) => got.push(m.seq));
  c.on("error", (e) => errors.push(e.code));
  c.connect();
  await until("three polls", () => calls.length === 3);
  assert.equal(calls[0].url.toString().startsWith("https://node.test/poll?"), true, calls[0].url.toString());
  assert.equal(calls[0].url.searchParams.get("since"), null, "the first poll asks where to start");
  assert.equal(calls[0].init.headers.authorization, "Bearer jwt");
  assert.equal(calls[1].url.searchParams.get("since"), "room:r1@7:0");
  assert.equal(calls[2].url.searchParams.get("since"), "room:r1@7:2");
  assert.deepEqual(got, [1, 2]);
  await until("the client to stop", () => c.state === States.CLOSED);
  assert.deepEqual(errors, ["4401"]);
});

test("publish resolves with the server's ack or rejection", async () => {
  const c = await client({ userId: "alice", rooms: ["live-1"] });
  const [ws] = ScriptedSocket.all;
  await assert.rejects(c.publish("live-1", { text: "too early" }), /connected WebSocket/);
  connected(ws, { rooms: ["live-1"] });
  const first = c.publish("live-1", { text: "hi" });
  const second = c.publish("live-1", { text: "hi" });
  assert.deepEqual(ws.sent.slice(-2).map((f) => [f.type, f.room, f.data.text, f.ref]), [["publish", "live-1", "hi", "p1"], ["publish", "live-1", "hi", "p2"]]);
  ws.frame({ type: "rejected", ref: "p2", room: "live-1", reason: "duplicate", message: "the same comment was just sent" });
  ws.frame({ type: "ack", ref: "p1", room: "live-1", id: "m1", seq: 7 });
  assert.equal((await first).seq, 7);
  assert.equal((await second).reason, "duplicate");
  c.close();
});

test("batch frames are delivered as their messages, in order, once", async () => {
  const c = await client({ userId: "alice", rooms: ["hot"] });
  const got = [];
  c.on("message", (m) => got.push(m.seq));
  const [ws] = ScriptedSocket.all;
  connected(ws, { rooms: ["hot"] });
  ws.frame(message("room:hot", 1));
  ws.frame({ type: "batch", messages: [message("room:hot", 1), message("room:hot", 2), message("room:hot", 3)] });
  ws.frame({ type: "batch", messages: [message("room:hot", 4)] });
  assert.deepEqual(got, [1, 2, 3, 4]);
  c.close();
});
