// What carries the frames: a WebSocket (browsers, node), or TCP / TLS
// (node only, in tcp.ts, loaded only when asked for so that browsers never
// see it).

/** One connection. Bytes in, bytes out; `onClose` fires once. */
export interface Transport {
  send(bytes: Uint8Array): void;
  close(): void;
  onData: (bytes: Uint8Array) => void;
  onClose: (why: string) => void;
}

/** Where to connect. */
export type Endpoint =
  | { kind: "ws"; url: string }
  | { kind: "tcp"; host: string; port: number; tls?: TlsOptions | boolean };

/** Node's `tls.connect` options (CA, server name, ...), as a plain object. */
export type TlsOptions = Record<string, unknown>;

/** The subset of the browser's `WebSocket` the SDK uses. */
export interface WebSocketLike {
  binaryType: string;
  readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code?: number; reason?: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketCtor = new (url: string) => WebSocketLike;

/** Open a WebSocket; resolves once it is open. */
export function openWebSocket(url: string, Ctor: WebSocketCtor, timeoutMs: number): Promise<Transport> {
  return new Promise((resolve, reject) => {
    let ws: WebSocketLike;
    try {
      ws = new Ctor(url);
    } catch (e) {
      reject(e instanceof Error ? e : new Error(String(e)));
      return;
    }
    ws.binaryType = "arraybuffer";
    let opened = false;
    let closed = false;
    const timer = setTimeout(() => {
      if (!opened) {
        ws.close();
        reject(new Error(`WebSocket ${url}: no answer in ${timeoutMs} ms`));
      }
    }, timeoutMs);
    const t: Transport = {
      send: (bytes) => ws.send(bytes),
      close: () => ws.close(1000),
      onData: () => {},
      onClose: () => {},
    };
    ws.onopen = () => {
      opened = true;
      clearTimeout(timer);
      resolve(t);
    };
    ws.onmessage = (ev) => {
      const d = ev.data;
      if (d instanceof ArrayBuffer) t.onData(new Uint8Array(d));
      else if (ArrayBuffer.isView(d)) t.onData(new Uint8Array(d.buffer, d.byteOffset, d.byteLength));
    };
    const end = (why: string) => {
      if (closed) return;
      closed = true;
      clearTimeout(timer);
      if (!opened) reject(new Error(`WebSocket ${url}: ${why}`));
      else t.onClose(why);
    };
    ws.onerror = () => end("error");
    ws.onclose = (ev) => end(`closed (${ev.code ?? "?"})`);
  });
}
