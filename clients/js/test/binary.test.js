// Binary frames (subprotocol barrage.v1.bin) against a real three-process
// cluster with batching and compression on: a binary and a JSON client in
// one room see the same comments in the same order; a raw socket shows the
// frames were binary, batched and compressed; the codec round-trips the
// client frames the server decodes.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";

import WebSocket from "ws";

import { BINARY_SUBPROTOCOL, BarrageClient, decodeBinaryFrame, encodeBinaryFrame } from "../barrage.js";
import { pushToRoom, startCluster, until, within } from "../support/harness.js";

const T = 20000;
let cluster;

before(async () => {
  cluster = await startCluster({ nodeEnv: { BATCH_WINDOW_MS: "50", BINARY_COMPRESS_BYTES: "64" } });
});

after(async () => {
  await cluster?.stop();
});

function client(userId, format) {
  const c = new BarrageClient({ url: cluster.ws, userId, rooms: ["arena"], WebSocket, format, heartbeatMs: 0 });
  const got = [];
  c.on("message", (m) => got.push(m));
  c.connect();
  return { c, got };
}

test("client frames encode to the documented header and body", () => {
  const join = encodeBinaryFrame({ type: "join", room: "r1" });
  // magic, version 1, type 1 (join), flags 0, length 4; field 1 "r1".
  assert.deepEqual([...join], [0xba, 0x7a, 1, 1, 0, 0, 0, 0, 4, 0x0a, 2, 0x72, 0x31]);
  assert.deepEqual([...encodeBinaryFrame({ type: "ping" })], [0xba, 0x7a, 1, 3, 0, 0, 0, 0, 0]);
  assert.throws(() => encodeBinaryFrame({ type: "message" }), /cannot send a message frame/);
});

test("an error frame names the room of a refused join", async () => {
  // Type 21; fields 1 code "forbidden", 2 message "no", 3 room "vip".
  const body = [0x0a, 9, ...Buffer.from("forbidden"), 0x12, 2, ...Buffer.from("no"), 0x1a, 3, ...Buffer.from("vip")];
  const frame = new Uint8Array([0xba, 0x7a, 1, 21, 0, 0, 0, 0, body.length, ...body]);
  assert.deepEqual(await decodeBinaryFrame(frame), { type: "error", code: "forbidden", message: "no", room: "vip" });
  // Without a room (field 3 absent), none is reported.
  const plain = new Uint8Array([0xba, 0x7a, 1, 21, 0, 0, 0, 0, 15, ...body.slice(0, 15)]);
  assert.deepEqual(await decodeBinaryFrame(plain), { type: "error", code: "forbidden", message: "no" });
});

test("malformed binary frames are refused with a reason", async () => {
  await assert.rejects(decodeBinaryFrame(new Uint8Array([1, 2, 3])), /not a barrage binary frame/);
  await assert.rejects(decodeBinaryFrame(new Uint8Array([0xba, 0x7a, 2, 22, 0, 0, 0, 0, 0])), /version 2/);
  await assert.rejects(decodeBinaryFrame(new Uint8Array([0xba, 0x7a, 1, 99, 0, 0, 0, 0, 0])), /unknown binary frame type 99/);
  assert.deepEqual(await decodeBinaryFrame(new Uint8Array([0xba, 0x7a, 1, 22, 0, 0, 0, 0, 0])), { type: "pong" });
});

test("binary and JSON clients see the same comments; frames are binary, batched and compressed", async () => {
  // A raw socket offering the subprotocol sees the frames as sent.
  const raw = new WebSocket(`${cluster.ws}?user_id=raw&rooms=arena`, [BINARY_SUBPROTOCOL]);
  const rawFrames = [];
  raw.on("message", (data, isBinary) => rawFrames.push({ data: new Uint8Array(data), isBinary }));
  await within(T, "raw socket", new Promise((res, rej) => { raw.once("open", res); raw.once("error", rej); }));
  assert.equal(raw.protocol, BINARY_SUBPROTOCOL);

  const bin = client("viewer-bin", "binary");
  const json = client("viewer-json", "json");
  await until("both connected", () => bin.c.session && json.c.session, T);
  assert.equal(bin.c.session.format, "binary");
  assert.equal(json.c.session.format, "json");

  // A burst of comments from both (batched by the node), some long enough to compress.
  const texts = Array.from({ length: 10 }, (_, i) => (i % 3 === 0 ? `long ${i} ${"so good ".repeat(20)}!` : `short ${i}`));
  const answers = await within(T, "publishes", Promise.all(texts.map((text, i) => (i % 2 ? json : bin).c.publish("arena", { text }))));
  assert.deepEqual(answers.map((a) => a.type), texts.map(() => "ack"));
  await pushToRoom(cluster.api, "arena", { text: "from the service" });

  const n = texts.length + 1;
  await until("every comment on both clients", () => bin.got.length >= n && json.got.length >= n, T);
  assert.deepEqual(bin.got, json.got, "both formats decode to the same messages");
  assert.deepEqual(bin.got.map((m) => m.seq), Array.from({ length: n }, (_, i) => i + 1));
  assert.deepEqual(new Set(bin.got.slice(0, -1).map((m) => m.data.text)), new Set(texts));
  assert.deepEqual(new Set(bin.got.slice(0, -1).map((m) => m.from)), new Set(["viewer-bin", "viewer-json"]));

  const decodeRaw = async () => {
    const out = { seqs: [], batches: 0, compressed: 0 };
    for (const f of rawFrames) {
      out.compressed += f.data[4] & 1;
      const frame = await decodeBinaryFrame(f.data);
      if (frame.type === "message") out.seqs.push(frame.seq);
      if (frame.type === "batch") {
        out.batches += 1;
        out.seqs.push(...frame.messages.map((m) => m.seq));
      }
    }
    return out;
  };
  const { seqs, batches, compressed } = await until("every comment on the raw socket", async () => {
    const r = await decodeRaw();
    return r.seqs.length >= n && r;
  }, T);
  assert.ok(rawFrames.every((f) => f.isBinary), "binary frames only");
  assert.deepEqual(seqs, bin.got.map((m) => m.seq), "the raw socket saw every comment in order");
  assert.ok(batches >= 1, "the burst was batched");
  assert.ok(compressed >= 1, "long frames were compressed");

  bin.c.close();
  json.c.close();
  raw.close();
});
