// TCP and TLS for node (imported by the client only when an endpoint is
// TCP, so a browser bundle never loads `node:net`).

import * as net from "node:net";
import * as tls from "node:tls";
import type { Transport, TlsOptions } from "./transport.js";

export function openTcp(
  host: string,
  port: number,
  useTls: TlsOptions | boolean | undefined,
  timeoutMs: number,
): Promise<Transport> {
  return new Promise((resolve, reject) => {
    const secure = useTls !== undefined && useTls !== false;
    const opts = typeof useTls === "object" ? useTls : {};
    const sock: net.Socket = secure
      ? tls.connect({ host, port, servername: host, ...opts })
      : net.connect({ host, port });
    sock.setNoDelay(true);
    let opened = false;
    let closed = false;
    const timer = setTimeout(() => {
      if (!opened) {
        sock.destroy();
        reject(new Error(`${host}:${port}: no connection in ${timeoutMs} ms`));
      }
    }, timeoutMs);
    const t: Transport = {
      send: (bytes) => {
        sock.write(bytes);
      },
      close: () => sock.end(),
      onData: () => {},
      onClose: () => {},
    };
    sock.once(secure ? "secureConnect" : "connect", () => {
      opened = true;
      clearTimeout(timer);
      resolve(t);
    });
    sock.on("data", (d: Buffer) => t.onData(new Uint8Array(d.buffer, d.byteOffset, d.byteLength)));
    const end = (why: string) => {
      if (closed) return;
      closed = true;
      clearTimeout(timer);
      sock.destroy();
      if (!opened) reject(new Error(`${host}:${port}: ${why}`));
      else t.onClose(why);
    };
    sock.on("error", (e) => end(e.message));
    sock.on("close", () => end("closed"));
    sock.on("end", () => end("closed by the gateway"));
  });
}
