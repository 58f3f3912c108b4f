// Rooms against a real three-process cluster whose connect-node verifies
// tokens: a join the token does not allow is refused, and the client stops
// asking for that room, so that its reconnects go through instead of being
// refused (403) one after the other.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";

import WebSocket from "ws";

import { BarrageClient } from "../barrage.js";
import { startCluster, until } from "../support/harness.js";

const T = 20000;
const SECRET = "a-test-secret-of-32-bytes-length";
let cluster;

before(async () => {
  cluster = await startCluster({ nodeEnv: { JWT_HS256_SECRET: SECRET } });
});

after(async () => {
  await cluster?.stop();
});

/** An HS256 connection token for `sub`, limited to `rooms`. */
function token(sub, rooms) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, rooms, exp: Math.floor(Date.now() / 1000) + 600 })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

test("a join the token forbids is forgotten, and the next connect goes through", async () => {
  const c = new BarrageClient({
    url: cluster.ws,
    token: token("carol", ["lobby"]),
    rooms: ["lobby"],
    WebSocket,
    transports: ["websocket"],
    backoff: { initialMs: 50, maxMs: 200 },
    heartbeatMs: 0,
  });
  const errors = [];
  c.on("error", (e) => errors.push(e));
  let connects = 0;
  c.on("connected", () => (connects += 1));
  c.connect();
  try {
    await until("connected", () => connects === 1, T);
    c.join("vip");
    await until("the join to be refused", () => errors.length > 0, T);
    assert.deepEqual({ ...errors[0], message: undefined }, { code: "forbidden", message: undefined, room: "vip" });
    assert.deepEqual([...c.rooms], ["lobby"]);

    // The node goes away and comes back: the client reconnects with the
    // rooms it may be in.
    await cluster.node.kill();
    await until("the drop to be noticed", () => c.state === "reconnecting", T);
    await cluster.node.start();
    await until("reconnected", () => connects === 2, T);
    assert.deepEqual(c.session.rooms, ["lobby"]);
  } finally {
    c.close();
  }
});
