// Test harness: real barrage processes on free loopback ports, a real
// grpcurl for pushes, deadline-bounded waits. Used by the end-to-end tests.

import { spawn, execFile } from "node:child_process";
import { existsSync, mkdirSync, openSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
const TARGET = process.env.CARGO_TARGET_DIR ? resolve(ROOT, process.env.CARGO_TARGET_DIR) : join(ROOT, "target");
export const BARRAGE = process.env.BARRAGE_BIN || join(TARGET, "debug", "barrage");
export const ARTIFACTS = join(TARGET, "test-artifacts");

export function grpcurlBin() {
  for (const c of [process.env.GRPCURL, join(ROOT, ".venv", "bin", "grpcurl")]) {
    if (c && existsSync(c)) return c;
  }
  return "grpcurl";
}

/** The first port of the kernel's ephemeral range. */
function ephemeralLow() {
  try {
    return Number(readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[0]) || 32768;
  } catch {
    return 32768;
  }
}

const LOWEST = 10000;
const given = new Set();

/** Whether a server could bind `port` on 127.0.0.1 now. */
function bindable(port) {
  return new Promise((res) => {
    const s = createServer();
    s.unref();
    s.once("error", () => res(false));
    s.listen(port, "127.0.0.1", () => s.close(() => res(true)));
  });
}

/**
 * A free port on 127.0.0.1 for a server started later (bound here, then
 * released). It comes from below the kernel's ephemeral range, so no
 * outgoing connection can take it before the server binds it, and no port
 * is handed out twice in one run (as the Rust and Python test kits do).
 */
export async function freePort() {
  const below = Math.max(ephemeralLow(), LOWEST + 1000);
  for (let attempt = 0; attempt < 500; attempt++) {
    const port = LOWEST + Math.floor(Math.random() * (below - LOWEST));
    if (given.has(port)) continue;
    if (await bindable(port)) {
      given.add(port);
      return port;
    }
  }
  throw new Error(`no free port on 127.0.0.1 between ${LOWEST} and ${below}`);
}

/**
 * Polls `check` until it returns something truthy; fails after `ms`, or at
 * once when `check` throws an error marked `fatal`.
 */
export async function until(what, check, ms = 20000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try {
      const v = await check();
      if (v) return v;
    } catch (e) {
      if (e.fatal) throw e;
      last = e;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}${last ? ` (last error: ${last.message})` : ""}`);
}

/** Rejects when `promise` takes longer than `ms`. */
export function within(ms, what, promise) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, rej) => {
      timer = setTimeout(() => rej(new Error(`${what}: no result within ${ms} ms`)), ms);
    }),
  ]);
}

async function ready(port) {
  const r = await fetch(`http://127.0.0.1:${port}/readyz`, { signal: AbortSignal.timeout(2000) });
  return r.ok;
}

/** A barrage process; `start()` waits for /readyz on `metricsPort`. */
export class Role {
  constructor(name, args, env, metricsPort) {
    this.name = name;
    this.args = args;
    this.env = env;
    this.metricsPort = metricsPort;
    this.proc = null;
  }

  async start() {
    mkdirSync(ARTIFACTS, { recursive: true });
    const logPath = join(tmpdir(), `barrage-js-${this.name}.log`);
    const log = openSync(logPath, "a");
    const env = { ...process.env, RUST_LOG: "info", ...this.env };
    for (const k of ["ETCD_ENDPOINTS", "NODE_ID", "MANAGER_ID"]) if (!(k in this.env)) delete env[k];
    this.proc = spawn(BARRAGE, this.args, { env, stdio: ["ignore", log, log] });
    const exited = new Promise((res) => this.proc.once("exit", res));
    this.exited = exited;
    try {
      await until(`${this.name} /readyz`, async () => {
        if (this.proc.exitCode !== null) {
          throw Object.assign(new Error(`${this.name} exited with ${this.proc.exitCode} (log: ${logPath})`), { fatal: true });
        }
        return ready(this.metricsPort);
      });
    } catch (e) {
      // A process left running would keep the test file from ending.
      await this.kill();
      throw e;
    }
    return this;
  }

  /** SIGKILL: no drain, no goodbye. */
  async kill() {
    if (this.proc && this.proc.exitCode === null) {
      this.proc.kill("SIGKILL");
      await within(10000, `${this.name} to die`, this.exited);
    }
  }

  async stop() {
    if (this.proc && this.proc.exitCode === null) {
      this.proc.kill("SIGTERM");
      await within(15000, `${this.name} to stop`, this.exited).catch(() => this.proc.kill("SIGKILL"));
    }
  }
}

/**
 * A three-process cluster without etcd: controller, push-manager and one
 * connect-node serving the demo page, each its own process. `nodeEnv`
 * adds settings of the connect-node.
 */
export async function startCluster({ nodeEnv = {} } = {}) {
  const p = {};
  for (const k of ["cGrpc", "cHttp", "mGrpc", "mHttp", "nGrpc", "nHttp", "ws"]) p[k] = await freePort();
  const base = { BIND_ADDR: "127.0.0.1", LOG_FORMAT: "text" };
  const controllerAddr = `127.0.0.1:${p.cGrpc}`;
  const controller = new Role("controller", ["controller"], { ...base, GRPC_PORT: `${p.cGrpc}`, METRICS_PORT: `${p.cHttp}` }, p.cHttp);
  const manager = new Role("push-manager", ["push-manager"],
    { ...base, GRPC_PORT: `${p.mGrpc}`, METRICS_PORT: `${p.mHttp}`, CONTROLLER_ADDRESS: controllerAddr }, p.mHttp);
  const node = new Role("connect-node", ["connect-node"], {
    ...base, GRPC_PORT: `${p.nGrpc}`, METRICS_PORT: `${p.nHttp}`, WS_PORT: `${p.ws}`, CONTROLLER_ADDRESS: controllerAddr,
    INSECURE_USER_ID: "true", DEMO_PAGE: "true", DEMO_PUBLISH_API: `127.0.0.1:${p.mGrpc}`, NODE_ID: "node-a",
    PUBLISH_ROOMS: "*", PUBLISH_API: `127.0.0.1:${p.mGrpc}`, ...nodeEnv,
  }, p.nHttp);
  try {
    await controller.start();
    await manager.start();
    await node.start();
  } catch (e) {
    // Those started are stopped, or the test file would never end.
    for (const r of [node, manager, controller]) await r.kill().catch(() => {});
    throw e;
  }
  return {
    ports: p,
    controller,
    manager,
    node,
    api: `127.0.0.1:${p.mGrpc}`,
    page: `http://127.0.0.1:${p.ws}/`,
    ws: `ws://127.0.0.1:${p.ws}/ws`,
    async stop() {
      for (const r of [node, manager, controller]) await r.stop().catch(() => {});
    },
  };
}

/** PushToRoom through the public gRPC API with the real grpcurl. */
export function pushToRoom(api, room, content) {
  const body = JSON.stringify({ room_id: room, content: JSON.stringify(content), event: "comment" });
  return new Promise((res, rej) => {
    execFile(grpcurlBin(), ["-plaintext", "-d", body, api, "barrage.v1.PushManager/PushToRoom"], { timeout: 15000 },
      (err, stdout, stderr) => (err ? rej(new Error(`grpcurl: ${err.message} ${stderr}`)) : res(JSON.parse(stdout))));
  });
}
