// The client side of the client link (docs/PROTOCOL.md section 2, and
// docs/client-guide.md): login, requests answered by promise, one ordered
// stream of responses and pushes delivered exactly once across drops,
// ACK and PING, RESUME with backoff and jitter, REDIRECT, KICK.

import {
  Code,
  codeName,
  encodeFrame,
  FrameDecoder,
  GAP,
  Kind,
  parseRedirect,
  parseSession,
  type Frame,
} from "./frame.js";
import { openWebSocket, type Endpoint, type Transport, type WebSocketCtor } from "./transport.js";
import { LoginError, RequestError } from "./types.js";
import type { ClientEvents, ClientOptions, Response, SessionInfo } from "./types.js";

type Listener<T> = (ev: T) => void;

interface Pending {
  /** The request's frame, sent again after a REDIRECT. */
  frame: Uint8Array;
  resolve: (r: Response) => void;
  reject: (e: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

interface LoginWait {
  reqId: number;
  resolve: (s: SessionInfo) => void;
  reject: (e: Error) => void;
  session?: SessionInfo;
}

const TERMINAL_KICKS: number[] = [Code.REPLACED, Code.ADMIN, Code.PROTOCOL_ERROR, Code.LOGIN_TIMEOUT];

export class GatewayClient {
  private endpoint: Endpoint;
  private readonly o: Required<Omit<ClientOptions, "url" | "tcp" | "WebSocket" | "reconnect">> & {
    reconnect: { minMs: number; maxMs: number; maxAttempts: number };
  };
  private readonly WebSocketImpl?: WebSocketCtor;
  private transport?: Transport;
  private decoder: FrameDecoder;
  private listeners = new Map<keyof ClientEvents, Set<Listener<never>>>();
  private pending = new Map<number, Pending>();
  /** Frames to send once the session is back (requests made while away). */
  private outbox: Uint8Array[] = [];
  private nextReq = 1;
  /** The highest seq received in order. */
  private lastSeq = 0;
  private ackedSeq = 0;
  private ackTimer?: ReturnType<typeof setTimeout>;
  private pingTimer?: ReturnType<typeof setInterval>;
  private lastHeard = 0;
  private token?: Uint8Array;
  private player?: bigint;
  private loginReq?: { msgId: number; body: Uint8Array };
  private loginWait?: LoginWait;
  private resumeWait?: { resolve: (ok: boolean) => void };
  private live = false;
  private stopped = false;
  private reconnecting = false;
  private redirectNow = false;
  /** A REDIRECT came: requests unanswered then were never read (the
   *  source answers all it read first), so they go again at the target. */
  private resendPending = false;
  private terminal?: string;

  constructor(opts: ClientOptions) {
    if (opts.url) this.endpoint = { kind: "ws", url: opts.url };
    else if (opts.tcp) this.endpoint = { kind: "tcp", ...opts.tcp };
    else throw new Error("GatewayClient: give `url` (WebSocket) or `tcp`");
    const ping = opts.pingIntervalMs ?? 15000;
    this.o = {
      ackEvery: opts.ackEvery ?? 32,
      ackDelayMs: opts.ackDelayMs ?? 200,
      pingIntervalMs: ping,
      deadAfterMs: opts.deadAfterMs ?? ping * 3,
      requestTimeoutMs: opts.requestTimeoutMs ?? 15000,
      connectTimeoutMs: opts.connectTimeoutMs ?? 10000,
      relogin: opts.relogin ?? true,
      maxFrame: opts.maxFrame ?? 65536,
      reconnect: {
        minMs: opts.reconnect?.minMs ?? 100,
        maxMs: opts.reconnect?.maxMs ?? 5000,
        maxAttempts: opts.reconnect?.maxAttempts ?? Infinity,
      },
    };
    this.WebSocketImpl = opts.WebSocket;
    this.decoder = new FrameDecoder(this.o.maxFrame);
  }

  // ----- events --------------------------------------------------------

  on<K extends keyof ClientEvents>(event: K, fn: Listener<ClientEvents[K]>): this {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(fn as Listener<never>);
    return this;
  }

  off<K extends keyof ClientEvents>(event: K, fn: Listener<ClientEvents[K]>): this {
    this.listeners.get(event)?.delete(fn as Listener<never>);
    return this;
  }

  private emit<K extends keyof ClientEvents>(event: K, ev: ClientEvents[K]): void {
    for (const fn of this.listeners.get(event) ?? []) {
      try {
        (fn as Listener<ClientEvents[K]>)(ev);
      } catch (e) {
        // An app listener's error must not break the stream.
        console.error(`slg-gateway-client: a '${event}' listener threw`, e);
      }
    }
  }

  // ----- state ---------------------------------------------------------

  /** The highest seq received in order (what ACK and PING report). */
  get last(): number {
    return this.lastSeq;
  }

  /** The logged-in player, if any. */
  get playerId(): bigint | undefined {
    return this.player;
  }

  /** Logged in and connected now. */
  get connected(): boolean {
    return this.live;
  }

  // ----- connecting ----------------------------------------------------

  /** Open the connection (not yet logged in). */
  async connect(): Promise<void> {
    if (this.stopped) throw new Error("the client is closed");
    await this.open();
  }

  private async open(): Promise<void> {
    const t = await this.openTransport(this.endpoint);
    this.decoder = new FrameDecoder(this.o.maxFrame);
    this.transport = t;
    this.lastHeard = Date.now();
    t.onData = (b) => this.onBytes(t, b);
    t.onClose = (why) => this.onTransportClosed(t, why);
  }

  private async openTransport(e: Endpoint): Promise<Transport> {
    if (e.kind === "ws") {
      const Ctor = this.WebSocketImpl ?? (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
      if (!Ctor) throw new Error("no WebSocket on this platform: pass `WebSocket` in the options");
      return openWebSocket(e.url, Ctor, this.o.connectTimeoutMs);
    }
    const { openTcp } = await import("./tcp.js");
    return openTcp(e.host, e.port, e.tls, this.o.connectTimeoutMs);
  }

  /**
   * Log in through the login route `msgId` with `body`. Resolves when the
   * login's RESPONSE came (after SESSION and any replayed frames); rejects
   * with `LoginError` if the backend or the gateway refused.
   */
  login(msgId: number, body: Uint8Array | string): Promise<SessionInfo> {
    const bytes = typeof body === "string" ? new TextEncoder().encode(body) : body;
    if (!this.transport) return Promise.reject(new Error("connect() first"));
    if (this.loginWait) return Promise.reject(new Error("a login is in progress"));
    this.loginReq = { msgId, body: bytes };
    return this.sendLogin(msgId, bytes);
  }

  private sendLogin(msgId: number, body: Uint8Array): Promise<SessionInfo> {
    return new Promise((resolve, reject) => {
      const reqId = this.takeReqId();
      this.loginWait = { reqId, resolve, reject };
      this.write(encodeFrame({ kind: Kind.Request, msgId, reqId }, body));
    });
  }

  /** Send a request; resolves with its RESPONSE (any code), whenever it
   *  comes: after a drop it comes on the resumed connection. */
  request(msgId: number, body: Uint8Array | string = new Uint8Array(0)): Promise<Response> {
    const bytes = typeof body === "string" ? new TextEncoder().encode(body) : body;
    if (this.stopped) return Promise.reject(new RequestError("the client is closed", "closed"));
    if (this.player === undefined) {
      return Promise.reject(new RequestError("log in first", "not-logged-in"));
    }
    const reqId = this.takeReqId();
    const frame = encodeFrame({ kind: Kind.Request, msgId, reqId }, bytes);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(reqId);
        reject(new RequestError(`request ${reqId} (msg ${msgId}) unanswered in ${this.o.requestTimeoutMs} ms`, "timeout"));
      }, this.o.requestTimeoutMs);
      this.pending.set(reqId, { frame, resolve, reject, timer });
      if (this.live) this.write(frame);
      else this.outbox.push(frame);
    });
  }

  /** End the player at the gateway (no resume afterwards) and close. */
  bye(): void {
    if (this.transport && this.live) this.write(encodeFrame({ kind: Kind.Bye }));
    this.stop("bye");
  }

  /** Close the connection; the player lingers at the gateway (a new
   *  client may resume it with its token). */
  close(): void {
    this.stop("closed by the app");
  }

  private stop(why: string): void {
    if (this.stopped) return;
    this.stopped = true;
    this.live = false;
    this.clearTimers();
    const t = this.transport;
    this.transport = undefined;
    t?.close();
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new RequestError(`the client closed: ${why}`, "closed"));
    }
    this.pending.clear();
    this.loginWait?.reject(new Error(`the client closed: ${why}`));
    this.loginWait = undefined;
    this.emit("closed", { why });
  }

  private takeReqId(): number {
    const r = this.nextReq;
    this.nextReq = this.nextReq >= 0xffffffff ? 1 : this.nextReq + 1;
    return r;
  }

  private write(frame: Uint8Array): void {
    try {
      this.transport?.send(frame);
    } catch {
      // The close event follows.
    }
  }

  // ----- receiving -----------------------------------------------------

  private onBytes(t: Transport, bytes: Uint8Array): void {
    if (t !== this.transport) return;
    this.lastHeard = Date.now();
    this.decoder.push(bytes);
    try {
      for (let f = this.decoder.next(); f; f = this.decoder.next()) {
        this.onFrame(f);
        if (t !== this.transport) return;
      }
    } catch (e) {
      this.emit("error", { message: e instanceof Error ? e.message : String(e) });
      t.close();
    }
  }

  private onFrame(f: Frame): void {
    switch (f.kind) {
      case Kind.Response:
      case Kind.Push:
        if (f.seq === 0) return this.onUnsequenced(f);
        return this.onSequenced(f);
      case Kind.Session:
        return this.onSession(f);
      case Kind.Pong:
        return;
      case Kind.Kick:
        return this.onKick(f.code);
      case Kind.Redirect:
        return this.onRedirect(f);
      case Kind.Error:
        return this.onError(f.code);
      default:
        this.emit("error", { message: `unexpected frame kind 0x${f.kind.toString(16)}` });
    }
  }

  /** seq 0: answers before login (a refused login among them). */
  private onUnsequenced(f: Frame): void {
    const w = this.loginWait;
    if (w && f.kind === Kind.Response && f.reqId === w.reqId) {
      this.loginWait = undefined;
      w.reject(new LoginError(f.code));
      return;
    }
    if (f.kind === Kind.Response) this.settle(f);
  }

  private onSequenced(f: Frame): void {
    if (f.seq <= this.lastSeq) return; // a login's replay of what we had
    if (f.seq !== this.lastSeq + 1) {
      this.emit("error", { message: `seq ${f.seq} where ${this.lastSeq + 1} was due` });
    }
    this.lastSeq = f.seq;
    if (f.kind === Kind.Push) {
      this.emit("push", { msgId: f.msgId, seq: f.seq, body: f.body });
    } else {
      const w = this.loginWait;
      if (w && f.reqId === w.reqId && w.session) {
        this.loginWait = undefined;
        this.goLive();
        w.resolve(w.session);
      } else {
        this.settle(f);
        this.emit("response", { code: f.code, msgId: f.msgId, reqId: f.reqId, seq: f.seq, body: f.body });
      }
    }
    this.noteForAck();
  }

  private settle(f: Frame): void {
    const p = this.pending.get(f.reqId);
    if (!p) return;
    this.pending.delete(f.reqId);
    clearTimeout(p.timer);
    p.resolve({ code: f.code, msgId: f.msgId, reqId: f.reqId, seq: f.seq, body: f.body });
  }

  private onSession(f: Frame): void {
    const { player, token } = parseSession(f.body);
    const r = f.seq;
    this.token = token;
    this.player = player;
    if (this.resumeWait) {
      const w = this.resumeWait;
      this.resumeWait = undefined;
      this.lastSeq = Math.max(this.lastSeq, r);
      const info = { player, resumed: true, resumePoint: r };
      this.goLive();
      this.emit("session", info);
      w.resolve(true);
      return;
    }
    const info = { player, resumed: false, resumePoint: r };
    if (f.code === GAP && r > this.lastSeq) {
      this.emit("gap", { reason: "SESSION_GAP", last: this.lastSeq, resumePoint: r });
      this.lastSeq = r;
    }
    if (this.loginWait) this.loginWait.session = info;
    this.emit("session", info);
  }

  private onKick(code: number): void {
    const reconnects = !TERMINAL_KICKS.includes(code);
    this.emit("kick", { code, name: codeName(code), reconnects });
    if (!reconnects) this.terminal = `kicked: ${codeName(code)}`;
    // The gateway closes this connection now: new requests wait.
    this.live = false;
  }

  private onRedirect(f: Frame): void {
    const { address, token } = parseRedirect(f.body);
    this.token = token;
    this.endpoint = redirected(this.endpoint, address);
    this.redirectNow = true;
    this.resendPending = true;
    // Nothing more is read from this connection: new requests wait.
    this.live = false;
    this.emit("redirect", { address });
  }

  private onError(code: number): void {
    if (this.resumeWait && (code === Code.RESUME_GAP || code === Code.RESUME_REJECTED)) {
      const w = this.resumeWait;
      this.resumeWait = undefined;
      this.emit("gap", {
        reason: code === Code.RESUME_GAP ? "RESUME_GAP" : "RESUME_REJECTED",
        last: this.lastSeq,
      });
      w.resolve(false);
      return;
    }
    this.emit("error", { code, message: `ERROR ${codeName(code)}` });
  }

  // ----- acknowledging and keep-alive ------------------------------------

  private noteForAck(): void {
    if (this.lastSeq - this.ackedSeq >= this.o.ackEvery) {
      this.sendAck();
    } else if (!this.ackTimer) {
      this.ackTimer = setTimeout(() => {
        this.ackTimer = undefined;
        this.sendAck();
      }, this.o.ackDelayMs);
    }
  }

  private sendAck(): void {
    if (this.ackTimer) {
      clearTimeout(this.ackTimer);
      this.ackTimer = undefined;
    }
    if (!this.live || this.lastSeq <= this.ackedSeq) return;
    this.ackedSeq = this.lastSeq;
    this.write(encodeFrame({ kind: Kind.Ack, seq: this.lastSeq }));
  }

  private goLive(): void {
    this.live = true;
    this.ackedSeq = Math.min(this.ackedSeq, this.lastSeq);
    if (!this.pingTimer) {
      this.pingTimer = setInterval(() => this.tick(), Math.max(50, Math.min(this.o.pingIntervalMs, this.o.deadAfterMs / 2)));
    }
    if (this.resendPending) {
      this.resendPending = false;
      const unanswered = [...this.pending.values()].map((p) => p.frame);
      const queued = new Set(this.outbox);
      for (const f of unanswered) if (!queued.has(f)) this.write(f);
    }
    const queued = this.outbox;
    this.outbox = [];
    for (const f of queued) this.write(f);
    if (this.lastSeq > this.ackedSeq) this.noteForAck();
  }

  private lastPing = 0;

  private tick(): void {
    const now = Date.now();
    if (!this.transport) return;
    if (now - this.lastHeard > this.o.deadAfterMs) {
      // Nothing heard for too long: a dead link. Drop it and resume.
      this.transport.close();
      this.onTransportClosed(this.transport, "no answer from the gateway");
      return;
    }
    if (this.live && now - this.lastPing >= this.o.pingIntervalMs) {
      this.lastPing = now;
      this.write(encodeFrame({ kind: Kind.Ping, seq: this.lastSeq }));
      this.ackedSeq = this.lastSeq;
    }
  }

  private clearTimers(): void {
    if (this.ackTimer) clearTimeout(this.ackTimer);
    if (this.pingTimer) clearInterval(this.pingTimer);
    this.ackTimer = undefined;
    this.pingTimer = undefined;
  }

  // ----- reconnecting ----------------------------------------------------

  private onTransportClosed(t: Transport, why: string): void {
    if (t !== this.transport) return;
    this.transport = undefined;
    this.live = false;
    this.resumeWait?.resolve(false);
    this.resumeWait = undefined;
    // A login that never finished: a first one is the app's to retry; a
    // login again after a refused resume is retried by the reconnect loop.
    const w = this.loginWait;
    this.loginWait = undefined;
    w?.reject(new Error(`connection lost during login: ${why}`));
    if (this.stopped) return;
    this.emit("disconnected", { why });
    if (this.terminal) return this.stop(this.terminal);
    if (!this.token) return this.stop(`disconnected before login: ${why}`);
    void this.reconnectLoop();
  }

  private async reconnectLoop(): Promise<void> {
    if (this.reconnecting) return;
    this.reconnecting = true;
    try {
      const r = this.o.reconnect;
      for (let attempt = 1; !this.stopped; attempt++) {
        if (attempt > r.maxAttempts) return this.stop("reconnect attempts used up");
        // REDIRECT: go at once. Otherwise full jitter, capped.
        const cap = Math.min(r.maxMs, r.minMs * 2 ** Math.min(attempt - 1, 20));
        const delay = this.redirectNow && attempt === 1 ? 0 : Math.floor(Math.random() * cap);
        this.redirectNow = false;
        this.emit("reconnecting", { attempt, delayMs: delay });
        await sleep(delay);
        if (this.stopped) return;
        try {
          await this.open();
        } catch {
          continue;
        }
        if (await this.resume()) return;
        if (!this.transport) continue; // dropped during the resume
        // RESUME_GAP / RESUME_REJECTED: log in again on this connection.
        if (!this.o.relogin || !this.loginReq) return this.stop("resume refused");
        try {
          await this.sendLogin(this.loginReq.msgId, this.loginReq.body);
          return;
        } catch (e) {
          if (e instanceof LoginError) return this.stop(e.message);
          // Dropped during the login: try again.
        }
      }
    } finally {
      this.reconnecting = false;
    }
  }

  /** RESUME on the fresh connection: true once SESSION came. */
  private resume(): Promise<boolean> {
    const token = this.token;
    if (!token) return Promise.resolve(false);
    return new Promise((resolve) => {
      this.resumeWait = { resolve };
      this.write(encodeFrame({ kind: Kind.Resume, seq: this.lastSeq }, token));
    });
  }
}

/** Where a REDIRECT sends the client: a URL is a WebSocket; a `host:port`
 *  keeps the transport (a WebSocket goes to ws://host:port + its path). */
export function redirected(from: Endpoint, address: string): Endpoint {
  if (address.includes("://")) return { kind: "ws", url: address };
  const i = address.lastIndexOf(":");
  const host = address.slice(0, i).replace(/^\[|\]$/g, "");
  const port = Number(address.slice(i + 1));
  if (from.kind === "tcp") return { ...from, host, port };
  const u = new URL(from.url);
  u.host = address;
  return { kind: "ws", url: u.toString() };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
