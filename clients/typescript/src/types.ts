// The SDK's public types: options, what requests and events carry, errors.

import { codeName } from "./frame.js";
import type { TlsOptions, WebSocketCtor } from "./transport.js";

/** How to reach the gateway and how the client behaves. */
export interface ClientOptions {
  /** A WebSocket URL (`ws://host:port/ws`, `wss://...`): browsers and node. */
  url?: string;
  /** Or TCP (node only): host, port, and TLS (true, or node `tls` options). */
  tcp?: { host: string; port: number; tls?: TlsOptions | boolean };
  /** The WebSocket implementation (default: the platform's `WebSocket`). */
  WebSocket?: WebSocketCtor;
  /** Acknowledge after this many frames (default 32) ... */
  ackEvery?: number;
  /** ... or this long after the first unacknowledged one (default 200 ms). */
  ackDelayMs?: number;
  /** PING this often while logged in (default 15 s; the gateway's
   *  `session_idle` is 60 s by default). */
  pingIntervalMs?: number;
  /** A connection that brought nothing for this long is dropped and
   *  resumed (default 3 ping intervals). */
  deadAfterMs?: number;
  /** A request unanswered this long is rejected with `RequestTimeout`
   *  (default 15 s: longer than the gateway's backend timeout, so that an
   *  answer the gateway owes arrives first). */
  requestTimeoutMs?: number;
  /** Time to open a connection (default 10 s). */
  connectTimeoutMs?: number;
  /** Reconnect delays: full jitter between 0 and min(maxMs, minMs * 2^n). */
  reconnect?: { minMs?: number; maxMs?: number; maxAttempts?: number };
  /** After `RESUME_REJECTED` or `RESUME_GAP`, log in again with the last
   *  login request (default true; false: the client closes instead). */
  relogin?: boolean;
  /** Largest frame accepted from the gateway (default 65536). */
  maxFrame?: number;
}

export interface Response {
  code: number;
  msgId: number;
  reqId: number;
  /** The player's seq (0 for an answer before login). */
  seq: number;
  body: Uint8Array;
}

export interface Push {
  msgId: number;
  seq: number;
  body: Uint8Array;
}

export interface SessionInfo {
  player: bigint;
  /** A resume (true) or a login (false). */
  resumed: boolean;
  /** The resume point R of the `SESSION`. */
  resumePoint: number;
}

/** Messages may have been missed: the app should refresh its state. */
export interface GapInfo {
  /** `RESUME_GAP` (frames were dropped), `RESUME_REJECTED` (the token no
   *  longer works: expired, or the player ended), `SESSION_GAP` (a login's
   *  `SESSION` said frames before R were dropped). */
  reason: "RESUME_GAP" | "RESUME_REJECTED" | "SESSION_GAP";
  /** The last seq the app had. */
  last: number;
  /** For `SESSION_GAP`: the seq the stream goes on after. */
  resumePoint?: number;
}

export interface KickInfo {
  code: number;
  /** `REPLACED`, `IDLE`, `SHUTDOWN`, `ADMIN`, `PROTOCOL_ERROR`, `SLOW_CONSUMER`. */
  name: string;
  /** The client resumes by itself (all but REPLACED, ADMIN, PROTOCOL_ERROR). */
  reconnects: boolean;
}

export interface ClientEvents {
  push: Push;
  /** Every sequenced response, also those whose request already timed out. */
  response: Response;
  session: SessionInfo;
  gap: GapInfo;
  kick: KickInfo;
  redirect: { address: string };
  reconnecting: { attempt: number; delayMs: number };
  disconnected: { why: string };
  /** The client stopped for good (close, BYE, a terminal kick, or
   *  reconnect attempts used up). */
  closed: { why: string };
  /** An `ERROR RATE_LIMITED` or a frame that broke the contract. */
  error: { code?: number; message: string };
}

/** A request's promise was rejected. */
export class RequestError extends Error {
  constructor(
    message: string,
    readonly reason: "timeout" | "closed" | "not-logged-in",
  ) {
    super(message);
  }
}

/** A login was refused (the code is the backend's, or the gateway's). */
export class LoginError extends Error {
  constructor(readonly code: number) {
    super(`login refused: ${codeName(code)}`);
  }
}

