// Types of the barrage JavaScript client (barrage.js).

export declare const States: Readonly<{
  IDLE: "idle";
  CONNECTING: "connecting";
  CONNECTED: "connected";
  RECONNECTING: "reconnecting";
  CLOSED: "closed";
}>;
export type State = (typeof States)[keyof typeof States];

export interface Position {
  epoch: number;
  seq: number;
}

export interface StreamState extends Position {
  /** Present for streams a position was sent for. */
  recovered?: boolean;
}

export interface MessageFrame {
  type: "message";
  /** `room:<id>`, `user:<id>` or `broadcast`. */
  stream: string;
  id: string;
  epoch: number;
  seq: number;
  event: string;
  /** The publishing user, for comments published by clients. */
  from?: string;
  /** The pushed content: parsed JSON when it was JSON, else a string. */
  data?: unknown;
  /** Binary payloads, base64. */
  data_b64?: string;
  /** Milliseconds since the Unix epoch, when the push was accepted. */
  timestamp: number;
}

export interface PublishAnswer {
  type: "ack" | "rejected";
  ref?: string;
  room: string;
  /** ack: the message id and its position in the room's stream. */
  id?: string;
  seq?: number;
  /** rejected: why (not_allowed, not_joined, invalid, too_long, rate_limited, room_rate_limited, sensitive, duplicate, unavailable). */
  reason?: string;
  message?: string;
}

export interface Session {
  userId: string;
  nodeId: string;
  connId: string;
  rooms: string[];
  streams: Record<string, StreamState>;
  /** False when some stream could not be resumed: refetch what you show. */
  recovered: boolean;
  transport: Transport;
  /** The frame format the server agreed to. */
  format: "json" | "binary";
}

export type Transport = "websocket" | "sse" | "poll";

export interface StateChange {
  state: State;
  previous: State;
  closeCode?: number;
  closeReason?: string;
  retryInMs?: number;
}

export interface ErrorEvent {
  code: string;
  message: string;
  /**
   * The room of a refused join or leave. A join refused for good
   * (`forbidden`, `invalid_room`, `too_many_rooms`) is also dropped from
   * the client's rooms, so reconnects do not ask for it again.
   */
  room?: string;
}

export interface Events {
  message: MessageFrame;
  connected: Session;
  joined: { room: string };
  left: { room: string };
  error: ErrorEvent;
  refreshed: { expiresAt: number };
  state: StateChange;
  ack: PublishAnswer;
  rejected: PublishAnswer;
  /** Moved to the next transport after repeated failures. */
  transport: { transport: Transport };
}

export interface ClientOptions {
  /** WebSocket URL of a connect-node, e.g. wss://push.example.com/ws */
  url: string;
  token?: string;
  /** Called before every connect attempt; wins over `token`. */
  getToken?: () => string | Promise<string>;
  /** `?user_id=` for nodes in insecure development mode. */
  userId?: string;
  rooms?: string[];
  backoff?: { initialMs?: number; maxMs?: number };
  /** Ping when idle this long; 0 turns it off. Default 20000. */
  heartbeatMs?: number;
  /** Message ids remembered for deduplication. Default 1000. */
  dedupWindow?: number;
  /** Positions to resume from (e.g. saved from a previous page load). */
  positions?: Record<string, Position>;
  /** WebSocket implementation; default the global one. */
  WebSocket?: unknown;
  /** Tried in order; default ["websocket", "sse", "poll"] (those available). */
  transports?: Transport[];
  /** Failed attempts in a row before moving to the next transport. Default 2. */
  fallbackAfter?: number;
  /** EventSource implementation for `sse`; default the global one. */
  EventSource?: unknown;
  /** fetch implementation for `poll`; default the global one. */
  fetch?: unknown;
  /** How long the server may hold a poll, seconds. Default 25. */
  pollTimeoutSecs?: number;
  /** WebSocket frames: "binary" asks for compact `barrage.v1.bin` frames; default "json". */
  format?: "json" | "binary";
}

export declare class BarrageClient {
  constructor(options: ClientOptions);
  readonly state: State;
  readonly session: Session | null;
  /** Last delivered position of every stream. */
  readonly positions: Record<string, Position>;
  readonly rooms: Set<string>;
  /** The transport in use. */
  readonly transport: Transport;
  on<E extends keyof Events>(event: E, fn: (payload: Events[E]) => void): () => void;
  off<E extends keyof Events>(event: E, fn: (payload: Events[E]) => void): void;
  connect(): void;
  join(room: string): void;
  leave(room: string): void;
  refresh(token: string): boolean;
  /** Publishes a comment to a room this connection is in (WebSocket transport). */
  publish(room: string, data: unknown, options?: { timeoutMs?: number }): Promise<PublishAnswer>;
  close(): void;
}

export declare function closeAction(code: number): "reconnect" | "recover" | "refresh" | "stop";
export declare function backoffDelay(
  attempt: number,
  backoff?: { initialMs?: number; maxMs?: number },
  random?: () => number,
): number;
export declare function formatPositions(positions: Record<string, Position>): string;
export declare function parsePositions(text: string): Record<string, Position>;

/** The WebSocket subprotocol that selects binary frames: "barrage.v1.bin". */
export declare const BINARY_SUBPROTOCOL: string;
/** Encodes a client frame (join, leave, ping, refresh, publish) as a binary frame. */
export declare function encodeBinaryFrame(frame: { type: string; [field: string]: unknown }): Uint8Array;
/** Decodes a binary server frame into the object its JSON frame would parse to. */
export declare function decodeBinaryFrame(data: ArrayBuffer | Uint8Array): Promise<{ type: string; [field: string]: unknown }>;
