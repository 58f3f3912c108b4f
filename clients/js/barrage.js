// barrage JavaScript client: one WebSocket to a connect-node, rooms,
// automatic reconnect with exponential backoff and jitter, and recovery of
// missed messages from the last (epoch, seq) of every stream.
//
// A plain ES module with no dependencies; runs in browsers and in Node
// (pass `WebSocket` from the `ws` package on Node < 22).
//
//   import { BarrageClient } from "./barrage.js";
//   const client = new BarrageClient({ url: "wss://push.example.com/ws", getToken: fetchToken, rooms: ["lobby"] });
//   client.on("message", (m) => console.log(m.stream, m.data));
//   client.connect();
//
// The wire protocol is described in docs/protocol.md.

/** Connection states, in the order a healthy connection goes through them. */
export const States = Object.freeze({
  IDLE: "idle",
  CONNECTING: "connecting",
  CONNECTED: "connected",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

/**
 * What a close code asks of the client (see the close-code table of
 * docs/protocol.md): "reconnect", "recover" (reconnect and resume from the
 * stored positions), "refresh" (get a new token, then reconnect) or "stop".
 */
export function closeAction(code) {
  if (code === 4405) return "refresh";
  if (code >= 4100 && code <= 4199) return "recover";
  if (code >= 4000 && code <= 4099) return "reconnect";
  if (code >= 4400 && code <= 4499) return "stop";
  if (code === 1009) return "stop"; // our frame was too big: resending it cannot help
  if (code === 1008) return "stop"; // policy violation
  // 1000 from the server, 1001 going away, 1006 abnormal (network), 1011, 1012, 1013...
  return "reconnect";
}

/**
 * Backoff before reconnect attempt `attempt` (0-based): "full jitter", a
 * uniform random delay in [0, min(maxMs, initialMs * 2^attempt)], so a
 * crowd of clients that lost the same node do not return in one instant.
 */
export function backoffDelay(attempt, { initialMs = 500, maxMs = 30000 } = {}, random = Math.random) {
  const cap = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/** Formats stream positions for the `positions` query parameter. */
export function formatPositions(positions) {
  return Object.keys(positions)
    .sort()
    .map((stream) => `${stream}@${positions[stream].epoch}:${positions[stream].seq}`)
    .join(",");
}

/** Parses what {@link formatPositions} produced. Throws on malformed input. */
export function parsePositions(text) {
  const out = {};
  for (const item of text.split(",").filter(Boolean)) {
    const at = item.lastIndexOf("@");
    const [epoch, seq] = item.slice(at + 1).split(":");
    if (at <= 0 || !/^\d+$/.test(epoch ?? "") || !/^\d+$/.test(seq ?? "")) {
      throw new Error(`${JSON.stringify(item)}: expected <stream>@<epoch>:<seq>`);
    }
    out[item.slice(0, at)] = { epoch: Number(epoch), seq: Number(seq) };
  }
  return out;
}

// ---- binary frames (subprotocol barrage.v1.bin) ----
//
// A 9-byte header (magic 0xBA 0x7A, version 1, frame type, flags, body
// length as big-endian u32) and a protobuf body from
// proto/barrage/v1/frames.proto; flag bit 0 marks a raw-DEFLATE body.

/** The WebSocket subprotocol that selects binary frames. */
export const BINARY_SUBPROTOCOL = "barrage.v1.bin";

const CLIENT_TYPES = { join: 1, leave: 2, ping: 3, refresh: 4, publish: 5 };
const SERVER_TYPES = { 16: "connected", 17: "message", 18: "batch", 19: "joined", 20: "left", 21: "error", 22: "pong", 23: "ack", 24: "rejected", 25: "refreshed" };
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

/** Reads protobuf fields; numbers are exact up to 2^53. */
class PbReader {
  constructor(bytes) {
    this.b = bytes;
    this.i = 0;
  }
  varint() {
    let v = 0;
    for (let shift = 0; shift < 70; shift += 7) {
      if (this.i >= this.b.length) throw new Error("truncated varint");
      const byte = this.b[this.i++];
      v += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return v;
    }
    throw new Error("varint too long");
  }
  bytes() {
    const n = this.varint();
    if (this.i + n > this.b.length) throw new Error("truncated field");
    const out = this.b.subarray(this.i, this.i + n);
    this.i += n;
    return out;
  }
  /** Calls `fn(fieldNumber, wireType)` for every field; `fn` reads the value or returns false to skip it. */
  fields(fn) {
    while (this.i < this.b.length) {
      const key = this.varint();
      const field = Math.floor(key / 8);
      const wire = key & 7;
      if (fn(field, wire) !== false) continue;
      if (wire === 0) this.varint();
      else if (wire === 2) this.bytes();
      else if (wire === 1) this.i += 8;
      else if (wire === 5) this.i += 4;
      else throw new Error(`unsupported wire type ${wire}`);
    }
  }
}

/** Decodes a message of string / integer / bool fields by field number. */
function pbFields(bytes, names, nested = {}) {
  const out = {};
  const r = new PbReader(bytes);
  r.fields((field, wire) => {
    const name = names[field];
    if (!name) return false;
    if (wire === 0) out[name] = r.varint();
    else if (wire === 2) {
      const raw = r.bytes();
      if (nested[name]) (out[name] ??= []).push(nested[name](raw));
      else out[name] = raw;
    } else return false;
  });
  return out;
}

function str(b) {
  return b ? fromUtf8.decode(b) : "";
}

function base64(bytes) {
  let bin = "";
  for (const x of bytes) bin += String.fromCharCode(x);
  return btoa(bin);
}

function decodeMessage(bytes) {
  const f = pbFields(bytes, { 1: "stream", 2: "id", 3: "epoch", 4: "seq", 5: "event", 6: "from", 7: "content", 8: "binary", 9: "timestamp" });
  const m = { type: "message", stream: str(f.stream), id: str(f.id), epoch: f.epoch ?? 0, seq: f.seq ?? 0, event: str(f.event) };
  if (f.from?.length) m.from = str(f.from);
  if (f.binary?.length) m.data_b64 = base64(f.binary);
  else {
    const content = str(f.content);
    try {
      m.data = JSON.parse(content);
    } catch {
      m.data = content;
    }
  }
  m.timestamp = f.timestamp ?? 0;
  return m;
}

function decodeBody(type, body) {
  switch (type) {
    case "message":
      return decodeMessage(body);
    case "batch":
      return { type, messages: pbFields(body, { 1: "messages" }, { messages: decodeMessage }).messages ?? [] };
    case "connected": {
      const entry = (b) => {
        const e = pbFields(b, { 1: "key", 2: "value" });
        const v = e.value ? pbFields(e.value, { 1: "epoch", 2: "seq", 3: "recovered" }) : {};
        const state = { epoch: v.epoch ?? 0, seq: v.seq ?? 0 };
        if (v.recovered !== undefined) state.recovered = v.recovered !== 0;
        return [str(e.key), state];
      };
      const c = pbFields(body, { 1: "conn_id", 2: "user_id", 3: "node_id", 4: "rooms", 5: "streams" }, { rooms: str, streams: entry });
      return { type, conn_id: str(c.conn_id), user_id: str(c.user_id), node_id: str(c.node_id), rooms: c.rooms ?? [], streams: Object.fromEntries(c.streams ?? []) };
    }
    case "joined": {
      const j = pbFields(body, { 1: "room", 2: "epoch", 3: "seq" });
      const out = { type, room: str(j.room) };
      if (j.epoch !== undefined && j.seq !== undefined) Object.assign(out, { epoch: j.epoch, seq: j.seq });
      return out;
    }
    case "left":
      return { type, room: str(pbFields(body, { 1: "room" }).room) };
    case "error": {
      const e = pbFields(body, { 1: "code", 2: "message", 3: "room" });
      const room = str(e.room);
      return { type, code: str(e.code), message: str(e.message), ...(room ? { room } : {}) };
    }
    case "ack":
    case "rejected": {
      const a = pbFields(body, type === "ack" ? { 1: "ref", 2: "room", 3: "id", 4: "seq" } : { 1: "ref", 2: "room", 3: "reason", 4: "message" });
      const out = { type, room: str(a.room) };
      if (a.ref?.length) out.ref = str(a.ref);
      if (type === "ack") Object.assign(out, { id: str(a.id), seq: a.seq ?? 0 });
      else Object.assign(out, { reason: str(a.reason), message: str(a.message) });
      return out;
    }
    case "refreshed":
      return { type, expires_at: pbFields(body, { 1: "expires_at" }).expires_at ?? 0 };
    default:
      return { type };
  }
}

async function inflateRaw(bytes) {
  const ds = new DecompressionStream("deflate-raw");
  const writer = ds.writable.getWriter();
  writer.write(bytes);
  writer.close();
  return new Uint8Array(await new Response(ds.readable).arrayBuffer());
}

/**
 * Decodes a binary frame from the server into the same object its JSON
 * frame would parse to. Async because compressed bodies are inflated with
 * the platform's DecompressionStream.
 */
export async function decodeBinaryFrame(data) {
  const b = data instanceof Uint8Array ? data : new Uint8Array(data);
  if (b.length < 9 || b[0] !== 0xba || b[1] !== 0x7a) throw new Error("not a barrage binary frame");
  if (b[2] !== 1) throw new Error(`binary frame version ${b[2]}, this client speaks 1`);
  const type = SERVER_TYPES[b[3]];
  if (!type) throw new Error(`unknown binary frame type ${b[3]}`);
  const len = ((b[5] << 24) >>> 0) + (b[6] << 16) + (b[7] << 8) + b[8];
  if (len !== b.length - 9) throw new Error(`binary frame says ${len} body bytes, has ${b.length - 9}`);
  let body = b.subarray(9);
  if (b[4] & 1) body = await inflateRaw(body);
  return decodeBody(type, body);
}

function pbVarint(out, v) {
  while (v >= 0x80) {
    out.push((v % 0x80) | 0x80);
    v = Math.floor(v / 0x80);
  }
  out.push(v);
}

function pbString(out, field, s) {
  if (s === undefined || s === null || s === "") return;
  const bytes = utf8.encode(String(s));
  pbVarint(out, field * 8 + 2);
  pbVarint(out, bytes.length);
  for (const x of bytes) out.push(x);
}

/** Encodes a client frame (`join`, `leave`, `ping`, `refresh`, `publish`) as a binary frame. */
export function encodeBinaryFrame(frame) {
  const type = CLIENT_TYPES[frame.type];
  if (!type) throw new Error(`cannot send a ${frame.type} frame`);
  const body = [];
  if (frame.type === "join" || frame.type === "leave") pbString(body, 1, frame.room);
  else if (frame.type === "refresh") pbString(body, 1, frame.token);
  else if (frame.type === "publish") {
    pbString(body, 1, frame.room);
    pbString(body, 2, JSON.stringify(frame.data ?? null));
    pbString(body, 3, frame.ref);
  }
  const out = new Uint8Array(9 + body.length);
  out.set([0xba, 0x7a, 1, type, 0, (body.length >>> 24) & 255, (body.length >>> 16) & 255, (body.length >>> 8) & 255, body.length & 255]);
  out.set(body, 9);
  return out;
}

/** A set that remembers the last `limit` keys it was given. */
class RecentIds {
  constructor(limit) {
    this.limit = limit;
    this.set = new Set();
  }
  /** Adds `id`; false when it was already there. */
  add(id) {
    if (this.set.has(id)) return false;
    this.set.add(id);
    if (this.set.size > this.limit) this.set.delete(this.set.values().next().value);
    return true;
  }
}

/**
 * A barrage connection that stays connected.
 *
 * Events (subscribe with `on`, unsubscribe with `off`):
 * - `message` (MessageFrame): a pushed message, once, in stream order;
 * - `connected` ({ userId, nodeId, connId, rooms, streams, recovered }):
 *   every (re)connect; `recovered` is false when some stream could not be
 *   resumed (the app should refetch what it shows);
 * - `joined` / `left` ({ room });
 * - `error` ({ code, message, room? }): an `error` frame, or a fatal close
 *   (`code` is then the close code as a string); `room` names the room of
 *   a refused join or leave. A join refused for good (`forbidden`,
 *   `invalid_room`, `too_many_rooms`) also drops the room from `rooms`,
 *   so reconnects do not ask for it again;
 * - `state` ({ state, previous, closeCode?, closeReason?, retryInMs? }).
 */
/** `error` codes that refuse a join for good: the room leaves `rooms`. */
const JOIN_REFUSALS = new Set(["forbidden", "invalid_room", "too_many_rooms"]);

export class BarrageClient {
  /**
   * @param {object} options
   * @param {string} options.url WebSocket URL of a connect-node, e.g. ws://127.0.0.1:8080/ws
   * @param {string} [options.token] connection JWT
   * @param {() => (string|Promise<string>)} [options.getToken] called before every connect; wins over `token`
   * @param {string} [options.userId] `?user_id=` for nodes in insecure development mode
   * @param {string[]} [options.rooms] rooms to be in
   * @param {{initialMs?: number, maxMs?: number}} [options.backoff]
   * @param {number} [options.heartbeatMs] send a ping when idle this long; 0 turns it off (default 20000)
   * @param {number} [options.dedupWindow] message ids remembered for deduplication (default 1000)
   * @param {Record<string,{epoch:number,seq:number}>} [options.positions] positions to resume from
   * @param {typeof WebSocket} [options.WebSocket] WebSocket implementation (default: the global one)
   * @param {Array<"websocket"|"sse"|"poll">} [options.transports] tried in order; a transport that fails
   *   `fallbackAfter` times in a row without connecting gives way to the next (default all three)
   * @param {number} [options.fallbackAfter] default 2
   * @param {typeof EventSource} [options.EventSource] for the `sse` transport (default: the global one)
   * @param {typeof fetch} [options.fetch] for the `poll` transport (default: the global one)
   * @param {number} [options.pollTimeoutSecs] how long a poll may be held (default 25)
   * @param {"json"|"binary"} [options.format] WebSocket frame format: "binary" asks for the compact
   *   `barrage.v1.bin` frames (smaller; compressed frames need DecompressionStream), "json" (default) for text
   */
  constructor(options) {
    if (!options || typeof options.url !== "string") throw new TypeError("options.url is required");
    this.options = { heartbeatMs: 20000, dedupWindow: 1000, backoff: {}, fallbackAfter: 2, pollTimeoutSecs: 25, ...options };
    this.WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    this.EventSourceImpl = options.EventSource ?? globalThis.EventSource;
    this.fetchImpl = options.fetch ?? globalThis.fetch?.bind(globalThis);
    const available = { websocket: !!this.WebSocketImpl, sse: !!this.EventSourceImpl, poll: !!this.fetchImpl };
    this.transports = (options.transports ?? ["websocket", "sse", "poll"]).filter((t) => available[t]);
    if (!this.transports.length) throw new TypeError("no usable transport: pass options.WebSocket, EventSource or fetch");
    this.transportIndex = 0;
    this.failures = 0;
    this.rooms = new Set(options.rooms ?? []);
    this.positions = { ...(options.positions ?? {}) };
    this.seen = new RecentIds(this.options.dedupWindow);
    this.handlers = new Map();
    this.state = States.IDLE;
    this.ws = null; // the live connection of whichever transport
    this.connected = false;
    this.attempt = 0;
    this.timer = null;
    this.heartbeat = null;
    this.lastFrameAt = 0;
    this.session = null;
  }

  /** Subscribes `fn` to `event`; returns a function that unsubscribes. */
  on(event, fn) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }

  /** Unsubscribes `fn` from `event`. */
  off(event, fn) {
    this.handlers.get(event)?.delete(fn);
  }

  emit(event, payload) {
    for (const fn of [...(this.handlers.get(event) ?? [])]) {
      try {
        fn(payload);
      } catch (e) {
        // A failing handler must not break the connection or other handlers.
        console.error(`barrage: a "${event}" handler failed:`, e);
      }
    }
  }

  setState(state, extra = {}) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this.emit("state", { state, previous, ...extra });
  }

  /** Opens the connection (and keeps it open until {@link close}). */
  connect() {
    if (this.state === States.CONNECTING || this.state === States.CONNECTED) return;
    this.stopped = false;
    this.open();
  }

  /** The transport in use (`websocket`, `sse` or `poll`). */
  get transport() {
    return this.transports[this.transportIndex];
  }

  /** URL (for `path`: /ws, /sse or /poll), token and subprotocols of the next attempt. */
  async target(path = "/ws") {
    const url = new URL(this.options.url);
    if (path !== "/ws") {
      url.protocol = url.protocol === "wss:" ? "https:" : "http:";
      url.pathname = url.pathname.replace(/\/ws$/, "") + path;
    }
    if (this.options.userId) url.searchParams.set("user_id", this.options.userId);
    if (this.rooms.size) url.searchParams.set("rooms", [...this.rooms].join(","));
    const positions = formatPositions(this.positions);
    if (positions) url.searchParams.set("positions", positions);
    const token = this.options.getToken ? await this.options.getToken() : this.options.token;
    // Browsers cannot set headers on a WebSocket: the token rides in a
    // `bearer.<JWT>` subprotocol next to `barrage`, which the server selects
    // (or `barrage.v1.bin`, when offered, for binary frames).
    const protocols = this.options.format === "binary" ? [BINARY_SUBPROTOCOL, "barrage"] : ["barrage"];
    if (token) protocols.push(`bearer.${token}`);
    return { url: url.toString(), protocols, token };
  }

  async open() {
    this.setState(this.attempt === 0 ? States.CONNECTING : States.RECONNECTING);
    const transport = this.transport;
    let target;
    try {
      target = await this.target({ websocket: "/ws", sse: "/sse", poll: "/poll" }[transport]);
    } catch (e) {
      this.emit("error", { code: "token", message: `getToken failed: ${e?.message ?? e}` });
      this.scheduleReconnect();
      return;
    }
    if (this.stopped) return;
    this.connected = false;
    try {
      if (transport === "websocket") this.openWebSocket(target);
      else if (transport === "sse") this.openSse(target);
      else this.openPoll(target);
    } catch (e) {
      this.emit("error", { code: "connect", message: String(e?.message ?? e) });
      this.ws = null;
      this.countFailure();
      this.scheduleReconnect();
    }
  }

  openWebSocket(target) {
    const ws = new this.WebSocketImpl(target.url, target.protocols);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.inbox = Promise.resolve();
    ws.onmessage = (ev) => this.onFrame(ws, ev.data);
    ws.onclose = (ev) => this.onClose(ws, ev.code, ev.reason);
    ws.onerror = () => {}; // a close event follows with the details
  }

  openSse(target) {
    const url = new URL(target.url);
    // EventSource cannot send headers: the token goes in the query string.
    if (target.token) url.searchParams.set("token", target.token);
    const es = new this.EventSourceImpl(url.toString());
    const conn = {
      close: () => es.close(),
      send: null,
    };
    this.ws = conn;
    for (const type of ["connected", "message", "joined", "left", "error"]) {
      es.addEventListener(type, (ev) => this.onFrame(conn, ev.data));
    }
    es.addEventListener("close", (ev) => {
      es.close();
      let c = {};
      try {
        c = JSON.parse(ev.data);
      } catch {}
      this.onClose(conn, c.code ?? 1006, c.reason ?? "");
    });
    // EventSource would reconnect by itself; this client does it with
    // backoff and its own positions instead.
    es.onerror = () => {
      es.close();
      this.onClose(conn, 1006, "event stream failed");
    };
  }

  openPoll(target) {
    const abort = new AbortController();
    const conn = { close: () => abort.abort(), send: null };
    this.ws = conn;
    const headers = target.token ? { authorization: `Bearer ${target.token}` } : {};
    const loop = async () => {
      let first = true;
      while (this.ws === conn) {
        const url = new URL(target.url);
        url.searchParams.delete("positions");
        const since = formatPositions(this.positions);
        if (since) url.searchParams.set("since", since);
        url.searchParams.set("timeout_secs", String(this.options.pollTimeoutSecs));
        let body;
        try {
          const r = await this.fetchImpl(url.toString(), { headers, signal: abort.signal, cache: "no-store" });
          if (!r.ok) {
            const reason = (await r.text()).trim();
            const code = { 400: 4400, 401: 4401, 403: 4403 }[r.status] ?? (r.status === 429 || r.status >= 500 ? 1013 : 1006);
            return this.onClose(conn, code, reason);
          }
          body = await r.json();
        } catch (e) {
          return this.onClose(conn, 1006, String(e?.message ?? e));
        }
        if (this.ws !== conn) return;
        this.lastFrameAt = Date.now();
        if (first || body.recovered === false) {
          this.onConnected({ type: "connected", conn_id: "poll", user_id: body.user_id, node_id: body.node_id, rooms: body.rooms, streams: body.streams });
          first = false;
        }
        for (const m of body.messages) this.dispatch(m);
      }
    };
    loop();
  }

  /** Whether the live WebSocket agreed to binary frames. */
  get binary() {
    return this.ws?.protocol === BINARY_SUBPROTOCOL;
  }

  onFrame(ws, data) {
    if (ws !== this.ws) return;
    this.lastFrameAt = Date.now();
    if (this.binary) {
      // Frames are decoded one after the other (inflating is async), so
      // they are dispatched in the order they arrived.
      const bytes = typeof data === "string" ? null : data instanceof Uint8Array ? data : new Uint8Array(data);
      this.inbox = this.inbox.then(async () => {
        let frame;
        try {
          frame = bytes ? await decodeBinaryFrame(bytes) : JSON.parse(data);
        } catch (e) {
          this.emit("error", { code: "protocol", message: `the server sent a frame this client cannot decode: ${e?.message ?? e}` });
          return;
        }
        if (ws === this.ws) this.dispatch(frame);
      });
      return;
    }
    let frame;
    try {
      frame = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
    } catch {
      this.emit("error", { code: "protocol", message: "the server sent a frame that is not JSON" });
      return;
    }
    this.dispatch(frame);
  }

  dispatch(frame) {
    switch (frame.type) {
      case "connected":
        this.onConnected(frame);
        break;
      case "message":
        this.onMessage(frame);
        break;
      case "batch":
        for (const m of frame.messages ?? []) this.onMessage(m);
        break;
      case "joined":
        this.onJoined(frame);
        break;
      case "left":
        this.rooms.delete(frame.room);
        this.emit("left", { room: frame.room });
        break;
      case "error":
        // A join refused for good is forgotten: kept, it would go in
        // `rooms=` at every reconnect and have each refused in turn.
        if (frame.room && JOIN_REFUSALS.has(frame.code) && this.rooms.delete(frame.room)) {
          delete this.positions[`room:${frame.room}`];
        }
        this.emit("error", { code: frame.code, message: frame.message, ...(frame.room ? { room: frame.room } : {}) });
        break;
      case "ack":
      case "rejected": {
        const pending = this.pendingPublishes?.get(frame.ref);
        if (pending) {
          this.pendingPublishes.delete(frame.ref);
          clearTimeout(pending.timer);
          pending.resolve(frame);
        }
        this.emit(frame.type, frame);
        break;
      }
      case "refreshed":
        this.emit("refreshed", { expiresAt: frame.expires_at });
        break;
      case "pong":
        break;
      default:
        break; // frames from newer servers are ignored
    }
  }

  onConnected(frame) {
    this.attempt = 0;
    this.failures = 0;
    this.connected = true;
    let recovered = true;
    for (const [stream, s] of Object.entries(frame.streams ?? {})) {
      if (s.recovered === false) recovered = false;
      // Not recovered: start from where the stream is now; the app refetches.
      if (s.recovered === false || !this.positions[stream]) {
        this.positions[stream] = { epoch: s.epoch, seq: s.seq };
      }
    }
    this.session = {
      userId: frame.user_id,
      nodeId: frame.node_id,
      connId: frame.conn_id,
      rooms: frame.rooms,
      streams: frame.streams ?? {},
      recovered,
      transport: this.transport,
      format: this.transport === "websocket" && this.binary ? "binary" : "json",
    };
    this.setState(States.CONNECTED);
    this.emit("connected", this.session);
    if (this.transport !== "websocket") return;
    // Rooms asked for while the connection was being made.
    for (const room of this.rooms) {
      if (!frame.rooms.includes(room)) this.send({ type: "join", room });
    }
    this.startHeartbeat();
  }

  onJoined(frame) {
    // Where the room stood at the join: stored like a message's position,
    // so a reconnect recovers what was pushed after the join even when
    // nothing arrived in between (unless a message already moved past it).
    if (frame.epoch !== undefined && frame.seq !== undefined) {
      const stream = `room:${frame.room}`;
      const pos = this.positions[stream];
      if (!pos || (pos.epoch === frame.epoch && frame.seq > pos.seq)) {
        this.positions[stream] = { epoch: frame.epoch, seq: frame.seq };
      }
    }
    this.emit("joined", { room: frame.room });
  }

  onMessage(m) {
    const pos = this.positions[m.stream];
    const older = pos && pos.epoch === m.epoch && m.seq <= pos.seq;
    // A message id seen before is a repeat; without an id, an older seq is.
    // (Two pushes in flight at once may arrive in either order: an older
    // seq with a new id is a message, not a repeat.)
    if (m.id ? !this.seen.add(`${m.stream}/${m.id}`) : older) return;
    if (!older) this.positions[m.stream] = { epoch: m.epoch, seq: m.seq };
    this.emit("message", m);
  }

  onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    this.ws = null;
    this.stopHeartbeat();
    if (this.stopped) {
      this.setState(States.CLOSED, { closeCode: code, closeReason: reason });
      return;
    }
    const action = closeAction(code);
    if (action === "stop") {
      this.stopped = true;
      this.setState(States.CLOSED, { closeCode: code, closeReason: reason });
      this.emit("error", { code: String(code), message: reason || "closed by the server" });
      return;
    }
    if (!this.connected) this.countFailure();
    if (action === "refresh" && !this.options.getToken) {
      this.stopped = true;
      this.setState(States.CLOSED, { closeCode: code, closeReason: reason });
      this.emit("error", { code: String(code), message: "token expired and no getToken to renew it" });
      return;
    }
    this.scheduleReconnect({ closeCode: code, closeReason: reason });
  }

  /** A connect attempt that never got to `connected`; enough of them in a row move to the next transport. */
  countFailure() {
    this.failures += 1;
    if (this.failures >= this.options.fallbackAfter && this.transportIndex < this.transports.length - 1) {
      this.transportIndex += 1;
      this.failures = 0;
      this.attempt = 0;
      this.emit("transport", { transport: this.transport });
    }
  }

  /** Reconnects at once (SSE and long-poll take their rooms at connect). */
  reconnectNow() {
    const conn = this.ws;
    this.ws = null;
    this.stopHeartbeat();
    conn?.close(1000, "rooms changed");
    clearTimeout(this.timer);
    this.open();
  }

  scheduleReconnect(extra = {}) {
    if (this.stopped) return;
    const delay = backoffDelay(this.attempt, this.options.backoff);
    this.attempt += 1;
    this.setState(States.RECONNECTING, { ...extra, retryInMs: delay });
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), delay);
  }

  startHeartbeat() {
    this.stopHeartbeat();
    const every = this.options.heartbeatMs;
    if (!every) return;
    this.heartbeat = setInterval(() => {
      const idle = Date.now() - this.lastFrameAt;
      if (idle > 2 * every) {
        // Nothing heard, not even a pong: the connection is dead.
        this.ws?.close(4001, "no answer to heartbeat");
        this.onClose(this.ws, 4001, "no answer to heartbeat");
      } else if (idle >= every) {
        this.send({ type: "ping" });
      }
    }, Math.max(250, every / 2));
  }

  stopHeartbeat() {
    clearInterval(this.heartbeat);
    this.heartbeat = null;
  }

  send(frame) {
    if (this.ws?.send && this.state === States.CONNECTED) {
      this.ws.send(this.binary ? encodeBinaryFrame(frame) : JSON.stringify(frame));
      return true;
    }
    return false;
  }

  /** Joins `room` now (or at the next connect). */
  join(room) {
    if (this.rooms.has(room)) return;
    this.rooms.add(room);
    if (this.transport === "websocket") this.send({ type: "join", room });
    else if (this.state === States.CONNECTED) this.reconnectNow();
  }

  /** Leaves `room`. */
  leave(room) {
    if (!this.rooms.delete(room)) return;
    delete this.positions[`room:${room}`];
    if (this.transport === "websocket") this.send({ type: "leave", room });
    else if (this.state === States.CONNECTED) this.reconnectNow();
  }

  /**
   * Publishes a comment to a room this connection is in (WebSocket only).
   * Resolves with the server's `ack` or `rejected` frame.
   */
  publish(room, data, { timeoutMs = 10000 } = {}) {
    if (this.transport !== "websocket" || this.state !== States.CONNECTED) {
      return Promise.reject(new Error("publish needs a connected WebSocket"));
    }
    this.pendingPublishes ??= new Map();
    this.publishSeq = (this.publishSeq ?? 0) + 1;
    const ref = `p${this.publishSeq}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pendingPublishes.delete(ref);
        reject(new Error("no answer to publish"));
      }, timeoutMs);
      this.pendingPublishes.set(ref, { resolve, timer });
      this.send({ type: "publish", room, data, ref });
    });
  }

  /** Replaces the token of the live connection before it expires. */
  refresh(token) {
    this.options.token = token;
    return this.send({ type: "refresh", token });
  }

  /** Closes for good; no reconnect. Positions stay readable for a later resume. */
  close() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.stopHeartbeat();
    const ws = this.ws;
    if (ws && this.transport === "websocket") {
      ws.close(1000, "bye"); // the close event finishes the job
    } else {
      ws?.close();
      this.ws = null;
      this.setState(States.CLOSED);
    }
  }
}
