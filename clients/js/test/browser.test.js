// The demo page in a real headless Chromium against a real three-process
// cluster: gRPC pushes fly across the page; killing and restarting the
// connect-node the page is on shows the reconnect and loses no comment; the
// comment box publishes; a screenshot is kept in target/test-artifacts.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";

import { chromium } from "playwright-core";

import { ARTIFACTS, pushToRoom, startCluster, within } from "../support/harness.js";

const CHROMIUM = [process.env.CHROMIUM, "/usr/bin/chromium", "/usr/bin/chromium-browser"].find((p) => p && existsSync(p));
const T = 20000;

let cluster;
let browser;
let page;

before(async () => {
  assert.ok(CHROMIUM, "Chromium is required (apt-get install chromium, or set CHROMIUM)");
  // Binary frames with bodies of 64 bytes or more arrive compressed.
  cluster = await startCluster({ nodeEnv: { BINARY_COMPRESS_BYTES: "64" } });
  browser = await within(T, "chromium", chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] }));
  page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.setDefaultTimeout(T);
  page.on("pageerror", (e) => console.error("page error:", e));
});

after(async () => {
  await browser?.close();
  await cluster?.stop();
});

/** Texts of the chat list, in order. */
const chat = () => page.$$eval("#chat li[data-seq]", (lis) => lis.map((li) => li.lastChild.textContent));

test("a gRPC push flies across the page", async () => {
  await page.goto(`${cluster.page}demo?room=stage&user=viewer-1`);
  await page.waitForSelector('#state[data-state="connected"]');
  const reply = await pushToRoom(cluster.api, "stage", { text: "first!", user: "grpc" });
  assert.equal(reply.deliveredCount, 1);
  await page.waitForSelector('#danmaku .bullet:text("first!")');
  await page.waitForSelector('#chat li[data-seq]:has-text("first!")');
  assert.deepEqual(await chat(), ["first!"]);
});

test("the comment box publishes to the room", async () => {
  await page.fill("#comment", "hello from the page");
  await page.press("#comment", "Enter");
  await page.waitForSelector('#danmaku .bullet.mine:text("hello from the page")');
  assert.deepEqual(await chat(), ["first!", "hello from the page"]);
});

test("killing the node: the page reconnects and misses nothing", async () => {
  await cluster.node.kill();
  await page.waitForSelector('#state[data-state="reconnecting"]');
  // Pushed while the page has no connection: kept in the room's history.
  for (const n of [1, 2, 3]) {
    const r = await pushToRoom(cluster.api, "stage", { text: `while down ${n}`, user: "grpc" });
    assert.equal(r.deliveredCount ?? 0, 0);
  }
  await cluster.node.start();
  await page.waitForSelector('#state[data-state="connected"]');
  await page.waitForSelector('#recovered[data-recovered="true"]');
  await pushToRoom(cluster.api, "stage", { text: "back live", user: "grpc" });
  await page.waitForSelector('#chat li[data-seq]:has-text("back live")');
  assert.deepEqual(await chat(), ["first!", "hello from the page", "while down 1", "while down 2", "while down 3", "back live"]);
  const seqs = await page.$$eval("#chat li[data-seq]", (lis) => lis.map((li) => Number(li.dataset.seq)));
  assert.deepEqual(seqs, [1, 2, 3, 4, 5, 6], "in order, no gap, no duplicate");
  await page.waitForSelector('#danmaku .bullet:text("back live")');
  const shot = join(ARTIFACTS, "demo-page.png");
  await page.screenshot({ path: shot });
  assert.ok(statSync(shot).size > 10000, "a real screenshot");
});

for (const transport of ["sse", "poll"]) {
  test(`the page works over ${transport === "sse" ? "Server-Sent Events" : "long-polling"} too`, async () => {
    const p = await browser.newPage();
    p.setDefaultTimeout(T);
    try {
      await p.goto(`${cluster.page}demo?room=fallback-${transport}&user=viewer-${transport}&transports=${transport}`);
      await p.waitForSelector('#state[data-state="connected"]');
      await p.waitForSelector(`#node[data-transport="${transport}"]`);
      for (const n of [1, 2]) {
        await pushToRoom(cluster.api, `fallback-${transport}`, { text: `${transport} ${n}`, user: "grpc" });
      }
      await p.waitForSelector(`#chat li[data-seq="2"]:has-text("${transport} 2")`);
      const texts = await p.$$eval("#chat li[data-seq]", (lis) => lis.map((li) => li.lastChild.textContent));
      assert.deepEqual(texts, [`${transport} 1`, `${transport} 2`]);
    } finally {
      await p.close();
    }
  });
}

test("the page speaks binary frames, compressed ones included", async () => {
  const p = await browser.newPage();
  p.setDefaultTimeout(T);
  try {
    await p.goto(`${cluster.page}demo?room=binary&user=viewer-bin&format=binary`);
    await p.waitForSelector('#state[data-state="connected"]');
    assert.equal(await p.evaluate(() => window.barrage.session.format), "binary");
    const long = `a long comment ${"that compresses well ".repeat(8)}`.trim();
    await pushToRoom(cluster.api, "binary", { text: "short one", user: "grpc" });
    await pushToRoom(cluster.api, "binary", { text: long, user: "grpc" });
    await p.waitForSelector('#chat li[data-seq="2"]');
    const texts = await p.$$eval("#chat li[data-seq]", (lis) => lis.map((li) => li.lastChild.textContent));
    assert.deepEqual(texts, ["short one", long]);
    await p.fill("#comment", "typed in binary");
    await p.press("#comment", "Enter");
    await p.waitForSelector('#danmaku .bullet.mine:text("typed in binary")');
  } finally {
    await p.close();
  }
});
