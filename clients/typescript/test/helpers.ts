// Test helpers: a real gateway process (built by cargo, its demo backend
// in-process), a cuttable TCP proxy, a redis-server, HTTP calls.

import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as http from "node:http";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";

/** The repository root (this file runs from clients/typescript/dist/test). */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../..");

let built = false;

/** The gateway binary: $SLG_GATEWAY_BIN, or target/debug/slg-gateway (built once). */
export function gatewayBin(): string {
  const env = process.env.SLG_GATEWAY_BIN;
  if (env) return env;
  const bin = path.join(ROOT, "target", "debug", "slg-gateway");
  if (!built) {
    const r = spawnSync("cargo", ["build", "--quiet", "--bin", "slg-gateway"], { cwd: ROOT, stdio: "inherit" });
    if (r.status !== 0) throw new Error("cargo build of slg-gateway failed");
    built = true;
  }
  return bin;
}

/** A free loopback port (bound and released). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      const port = typeof a === "object" && a ? a.port : 0;
      s.close(() => resolve(port));
    });
  });
}

export interface GatewayOptions {
  /** A WebSocket listener too. */
  ws?: boolean;
  /** outbox.max_frames (the template's 1024 otherwise). */
  outboxFrames?: number;
  /** Member of a cluster on this Redis port, named `id`. */
  cluster?: { redisPort: number; id: string };
  shards?: number;
  /** TLS on the client TCP port with a certificate made here (openssl);
   *  its PEM is in `Gateway.certPem`. */
  tls?: boolean;
}

export interface Gateway {
  proc: ChildProcess;
  host: string;
  port: number;
  httpPort: number;
  wsUrl?: string;
  wsPort?: number;
  /** The certificate the gateway serves (with `tls`), to trust. */
  certPem?: string;
  stop(): Promise<void>;
}

/** Start the gateway binary on the shipped template with fresh ports. */
export async function startGateway(o: GatewayOptions = {}): Promise<Gateway> {
  const [port, httpPort, wsPort, demoPort] = [await freePort(), await freePort(), await freePort(), await freePort()];
  let text = fs.readFileSync(path.join(ROOT, "config", "gateway.ron"), "utf8");
  const sub = (from: string, to: string) => {
    if (!text.includes(from)) throw new Error(`template lacks ${from}`);
    text = text.split(from).join(to);
  };
  sub('listen: "127.0.0.1:7000"', `listen: "127.0.0.1:${port}"`);
  sub('http_listen: "127.0.0.1:7001"', `http_listen: "127.0.0.1:${httpPort}"`);
  sub('"127.0.0.1:7100"', `"127.0.0.1:${demoPort}"`);
  if (o.ws) sub("ws_listen: None,", `ws_listen: Some("127.0.0.1:${wsPort}"),`);
  if (o.outboxFrames !== undefined) sub("max_frames: 1024", `max_frames: ${o.outboxFrames}`);
  if (o.cluster) {
    const ws = o.ws ? `ws_advertise: Some("ws://127.0.0.1:${wsPort}/ws"),` : "";
    sub(
      "cluster: None,",
      `cluster: Some((redis: "redis://127.0.0.1:${o.cluster.redisPort}/", gateway_id: "${o.cluster.id}", ` +
        `advertise: "127.0.0.1:${port}", ${ws} lease: "5s")),`,
    );
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "slg-sdk-"));
  // Snapshots (on by default, in `state` under the working directory) go
  // to this gateway's own directory.
  sub('snapshot_dir: Some("state")', `snapshot_dir: Some(${JSON.stringify(path.join(dir, "state"))})`);
  let certPem: string | undefined;
  if (o.tls) {
    const cert = path.join(dir, "cert.pem");
    const key = path.join(dir, "key.pem");
    // A leaf for localhost (CA:FALSE: webpki refuses a CA as a server's own).
    const r = spawnSync("openssl", [
      "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
      "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
      "-addext", "subjectAltName=DNS:localhost", "-addext", "basicConstraints=critical,CA:FALSE",
    ]);
    if (r.status !== 0) throw new Error(`openssl failed: ${r.stderr}`);
    certPem = fs.readFileSync(cert, "utf8");
    sub("    tls: None,", `    tls: Some((cert: "${cert}", key: "${key}", client: true)),`);
  }
  const cfg = path.join(dir, "gateway.ron");
  fs.writeFileSync(cfg, text);
  const proc = spawn(gatewayBin(), ["--config", cfg, "--shards", String(o.shards ?? 2)], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: "warn" },
  });
  let out = "";
  let err = "";
  proc.stderr?.on("data", (d) => (err += d));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`gateway did not start: ${err}`)), 30000);
    proc.stdout?.on("data", (d) => {
      out += d;
      const ready = out.includes("gateway listening on") && (!o.ws || out.includes("websocket listening on"));
      if (ready) {
        clearTimeout(timer);
        resolve();
      }
    });
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`gateway exited ${code}: ${err}`));
    });
  });
  return {
    proc,
    host: "127.0.0.1",
    port,
    httpPort,
    wsPort: o.ws ? wsPort : undefined,
    wsUrl: o.ws ? `ws://127.0.0.1:${wsPort}/ws` : undefined,
    certPem,
    stop: () =>
      new Promise<void>((resolve) => {
        if (proc.exitCode !== null) return resolve();
        proc.once("exit", () => {
          fs.rmSync(dir, { recursive: true, force: true });
          resolve();
        });
        proc.kill("SIGKILL");
      }),
  };
}

/** An HTTP request to the gateway's API. */
export function httpCall(port: number, method: string, p: string, body = ""): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, method, path: p, headers: { "content-length": Buffer.byteLength(body) } }, (res) => {
      let text = "";
      res.on("data", (d) => (text += d));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, text }));
    });
    req.on("error", reject);
    req.end(body);
  });
}

/**
 * A TCP proxy in front of `target` whose connections the test can cut (a
 * real drop: both ends see the connection die) and refuse for a while.
 */
export class Proxy {
  private server: net.Server;
  private socks = new Set<net.Socket>();
  private refusing = false;
  port = 0;

  constructor(private targetPort: number) {
    this.server = net.createServer((c) => {
      if (this.refusing) {
        c.destroy();
        return;
      }
      const up = net.connect(this.targetPort, "127.0.0.1");
      this.socks.add(c);
      this.socks.add(up);
      c.pipe(up);
      up.pipe(c);
      const end = () => {
        c.destroy();
        up.destroy();
        this.socks.delete(c);
        this.socks.delete(up);
      };
      c.on("error", end);
      up.on("error", end);
      c.on("close", end);
      up.on("close", end);
    });
  }

  listen(): Promise<void> {
    return new Promise((resolve) =>
      this.server.listen(0, "127.0.0.1", () => {
        const a = this.server.address();
        this.port = typeof a === "object" && a ? a.port : 0;
        resolve();
      }),
    );
  }

  /** Drop every connection now; with `refuseMs`, refuse new ones that long. */
  cut(refuseMs = 0): void {
    for (const s of this.socks) s.destroy();
    this.socks.clear();
    if (refuseMs > 0) {
      this.refusing = true;
      setTimeout(() => (this.refusing = false), refuseMs);
    }
  }

  close(): Promise<void> {
    this.cut();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

/** A redis-server of the test's own, or undefined when none is installed
 *  (a test then skips, unless CI is set). */
export async function startRedis(): Promise<{ port: number; stop: () => void } | undefined> {
  const port = await freePort();
  const which = spawnSync("sh", ["-c", "command -v redis-server"]);
  if (which.status !== 0) {
    if (process.env.CI) throw new Error("redis-server is required under CI");
    return undefined;
  }
  const proc = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
    stdio: "ignore",
  });
  const deadline = Date.now() + 5000;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, "127.0.0.1", () => {
        s.destroy();
        resolve(true);
      });
      s.on("error", () => resolve(false));
    });
    if (ok) break;
    if (Date.now() > deadline) throw new Error("redis-server did not start");
    await sleep(20);
  }
  return { port, stop: () => proc.kill("SIGKILL") };
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Wait until `cond()` holds, or fail after `ms`. */
export async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}
