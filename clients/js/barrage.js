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
 * - `error` ({ code, message }): an `error` frame, or a fatal close
 *   (`code` is then the close code as a string);
 * - `state` ({ state, previous, closeCode?, closeReason?, retryInMs? }).
 */
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
    // `bearer.<JWT>` subprotocol next to `barrage`, which the server selects.
    const protocols = token ? ["barrage", `bearer.${token}`] : ["barrage"];
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
    this.ws = ws;
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

  onFrame(ws, data) {
    if (ws !== this.ws) return;
    this.lastFrameAt = Date.now();
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
        this.emit("joined", { room: frame.room });
        break;
      case "left":
        this.rooms.delete(frame.room);
        this.emit("left", { room: frame.room });
        break;
      case "error":
        this.emit("error", { code: frame.code, message: frame.message });
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
      this.ws.send(JSON.stringify(frame));
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
