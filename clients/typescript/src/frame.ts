// The client link's frames (docs/PROTOCOL.md, sections 1, 2 and 4): a
// 4-byte length, a 20-byte header, the body. All integers big-endian.

/** Bytes of the length prefix. */
export const LEN_PREFIX = 4;
/** Bytes of the header after the length prefix. */
export const HEADER_LEN = 20;
/** The gateway's default `max_frame` (bytes after the length prefix). */
export const DEFAULT_MAX_FRAME = 65536;

/** Frame kinds, both directions. */
export const Kind = {
  Request: 0x01,
  Ping: 0x02,
  Resume: 0x03,
  Ack: 0x04,
  Bye: 0x05,
  Response: 0x81,
  Push: 0x82,
  Pong: 0x83,
  Session: 0x84,
  Kick: 0x85,
  Redirect: 0x86,
  Error: 0x87,
} as const;
export type Kind = (typeof Kind)[keyof typeof Kind];

/** The gateway's codes (application codes are below 0x8000). */
export const Code = {
  OK: 0x0000,
  NO_ROUTE: 0x8001,
  NOT_AUTHENTICATED: 0x8002,
  BACKEND_UNAVAILABLE: 0x8003,
  TIMEOUT: 0x8004,
  OVERLOADED: 0x8005,
  ALREADY_AUTHENTICATED: 0x8006,
  LOGIN_IN_PROGRESS: 0x8007,
  SHUTTING_DOWN: 0x8008,
  MIGRATING: 0x8009,
  RESUME_REJECTED: 0x8010,
  RESUME_GAP: 0x8011,
  RATE_LIMITED: 0x8012,
  /** An addition of this gateway: a login refused, the player already has a live session (`on_second_login: RejectNew`). */
  ALREADY_ONLINE: 0x8013,
  REPLACED: 0x8101,
  IDLE: 0x8102,
  SHUTDOWN: 0x8103,
  ADMIN: 0x8104,
  PROTOCOL_ERROR: 0x8105,
  SLOW_CONSUMER: 0x8106,
  /** An addition of this gateway: not logged in within `login_timeout`. */
  LOGIN_TIMEOUT: 0x8107,
} as const;

/** `GAP` in a `SESSION` is `RESUME_GAP`'s value. */
export const GAP = Code.RESUME_GAP;

/** The name of a code (`"0x0001"` style for application codes). */
export function codeName(code: number): string {
  for (const [name, value] of Object.entries(Code)) {
    if (value === code) return name;
  }
  return "0x" + code.toString(16).padStart(4, "0");
}

export interface Header {
  kind: number;
  code: number;
  msgId: number;
  reqId: number;
  /** `seq` on the client link. */
  seq: number;
}

export interface Frame extends Header {
  body: Uint8Array;
}

/** One frame's bytes. */
export function encodeFrame(h: Partial<Header> & { kind: number }, body: Uint8Array = EMPTY): Uint8Array {
  const out = new Uint8Array(LEN_PREFIX + HEADER_LEN + body.length);
  const v = new DataView(out.buffer);
  v.setUint32(0, HEADER_LEN + body.length);
  v.setUint8(4, h.kind);
  v.setUint8(5, 0);
  v.setUint16(6, h.code ?? 0);
  v.setUint32(8, h.msgId ?? 0);
  v.setUint32(12, h.reqId ?? 0);
  v.setBigUint64(16, BigInt(h.seq ?? 0));
  out.set(body, LEN_PREFIX + HEADER_LEN);
  return out;
}

export const EMPTY = new Uint8Array(0);

/** A frame the gateway sent that breaks the contract. */
export class FrameError extends Error {}

/**
 * Whole frames out of a byte stream: `push` bytes as they arrive, then
 * `next()` until it returns undefined.
 */
export class FrameDecoder {
  private buf: Uint8Array = EMPTY;

  constructor(private readonly maxFrame = DEFAULT_MAX_FRAME) {}

  push(bytes: Uint8Array): void {
    if (this.buf.length === 0) {
      this.buf = bytes;
      return;
    }
    const joined = new Uint8Array(this.buf.length + bytes.length);
    joined.set(this.buf, 0);
    joined.set(bytes, this.buf.length);
    this.buf = joined;
  }

  next(): Frame | undefined {
    if (this.buf.length < LEN_PREFIX) return undefined;
    const v = new DataView(this.buf.buffer, this.buf.byteOffset, this.buf.length);
    const len = v.getUint32(0);
    if (len < HEADER_LEN || len > this.maxFrame) {
      throw new FrameError(`frame length ${len} out of bounds`);
    }
    if (this.buf.length < LEN_PREFIX + len) return undefined;
    const f: Frame = {
      kind: v.getUint8(4),
      code: v.getUint16(6),
      msgId: v.getUint32(8),
      reqId: v.getUint32(12),
      seq: Number(v.getBigUint64(16)),
      body: this.buf.slice(LEN_PREFIX + HEADER_LEN, LEN_PREFIX + len),
    };
    this.buf = this.buf.subarray(LEN_PREFIX + len);
    if (this.buf.length === 0) this.buf = EMPTY;
    return f;
  }

  /** Bytes held of a frame not yet whole. */
  get buffered(): number {
    return this.buf.length;
  }

  clear(): void {
    this.buf = EMPTY;
  }
}

/** A `SESSION` body: the player id (u64), then the reconnect token. */
export function parseSession(body: Uint8Array): { player: bigint; token: Uint8Array } {
  if (body.length < 8) throw new FrameError("SESSION body too short");
  const v = new DataView(body.buffer, body.byteOffset, body.length);
  return { player: v.getBigUint64(0), token: body.slice(8) };
}

/**
 * A `REDIRECT` body: u16 address length, the address (`host:port`, or a
 * `ws://`/`wss://` URL for a WebSocket session), then a token valid there.
 */
export function parseRedirect(body: Uint8Array): { address: string; token: Uint8Array } {
  if (body.length < 2) throw new FrameError("REDIRECT body too short");
  const v = new DataView(body.buffer, body.byteOffset, body.length);
  const n = v.getUint16(0);
  if (body.length < 2 + n) throw new FrameError("REDIRECT address past the body");
  const address = new TextDecoder().decode(body.subarray(2, 2 + n));
  return { address, token: body.slice(2 + n) };
}
