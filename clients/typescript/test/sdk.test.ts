// The SDK against a real gateway process (its demo backend in-process):
// node's own test runner, `npm test`.

import { after, before, describe, test } from "node:test";
import * as assert from "node:assert/strict";
import { GatewayClient, type GapInfo, type Push } from "../src/index.js";
import { httpCall, Proxy, sleep, startGateway, startRedis, until, type Gateway } from "./helpers.js";

const LOGIN = 1;
const ECHO = 100;
const text = (b: Uint8Array) => new TextDecoder().decode(b);

/** Push `body` to `player` through the gateway's HTTP API. */
async function push(g: Gateway, player: number, body: string): Promise<void> {
  const r = await httpCall(g.httpPort, "POST", `/v1/push?players=${player}&msg=7`, body);
  assert.equal(r.status, 200, r.text);
}

describe("one gateway", () => {
  let g: Gateway;
  before(async () => {
    g = await startGateway({ ws: true });
  });
  after(async () => {
    await g.stop();
  });

  for (const over of ["tcp", "websocket"] as const) {
    test(`login and requests over ${over}`, async () => {
      const c = new GatewayClient(
        over === "tcp" ? { tcp: { host: g.host, port: g.port } } : { url: g.wsUrl! },
      );
      await c.connect();
      const s = await c.login(LOGIN, over === "tcp" ? "101" : "102");
      assert.equal(s.player, over === "tcp" ? 101n : 102n);
      assert.equal(s.resumed, false);
      for (let i = 0; i < 20; i++) {
        const r = await c.request(ECHO, `hello ${i}`);
        assert.equal(r.code, 0);
        assert.equal(text(r.body), `hello ${i}`);
        assert.equal(r.seq, i + 2);
      }
      // Several in flight at once.
      const many = await Promise.all(Array.from({ length: 30 }, (_, i) => c.request(ECHO, `m${i}`)));
      assert.deepEqual(
        many.map((r) => text(r.body)),
        Array.from({ length: 30 }, (_, i) => `m${i}`),
      );
      assert.equal(c.last, 51);
      c.bye();
    });
  }

  test("a refused login rejects with the backend's code", async () => {
    const c = new GatewayClient({ url: g.wsUrl! });
    await c.connect();
    await assert.rejects(c.login(LOGIN, "not a number"), (e: Error & { code?: number }) => e.code === 1);
    c.close();
  });

  for (const over of ["tcp", "websocket"] as const) {
    test(`a drop in the middle of a push stream over ${over}: resumed, every push once and in order`, async () => {
      const proxy = new Proxy(over === "tcp" ? g.port : g.wsPort!);
      await proxy.listen();
      const player = over === "tcp" ? 201 : 202;
      const c = new GatewayClient(
        over === "tcp"
          ? { tcp: { host: "127.0.0.1", port: proxy.port }, reconnect: { minMs: 20, maxMs: 200 } }
          : { url: `ws://127.0.0.1:${proxy.port}/ws`, reconnect: { minMs: 20, maxMs: 200 } },
      );
      const got: Push[] = [];
      const sessions: boolean[] = [];
      c.on("push", (p) => got.push(p));
      c.on("session", (s) => sessions.push(s.resumed));
      await c.connect();
      await c.login(LOGIN, String(player));
      const N = 200;
      for (let i = 1; i <= N; i++) {
        await push(g, player, `p${i}`);
        if (i === N / 2) proxy.cut(150);
      }
      await until(() => got.length >= N, 15000, `${N} pushes (have ${got.length})`);
      await sleep(200);
      assert.deepEqual(
        got.map((p) => text(p.body)),
        Array.from({ length: N }, (_, i) => `p${i + 1}`),
      );
      assert.ok(got.every((p, i) => i === 0 || p.seq === got[i - 1].seq + 1), "seqs consecutive");
      assert.deepEqual(sessions.slice(0, 2), [false, true], "a login, then a resume");
      // Requests go on after the resume.
      assert.equal(text((await c.request(ECHO, "after")).body), "after");
      c.bye();
      await proxy.close();
    });
  }
});

test("login and requests over TLS (node, TCP)", async () => {
  const g = await startGateway({ tls: true });
  try {
    const c = new GatewayClient({
      tcp: { host: "127.0.0.1", port: g.port, tls: { ca: g.certPem, servername: "localhost" } },
    });
    await c.connect();
    assert.equal((await c.login(LOGIN, "501")).player, 501n);
    for (let i = 0; i < 10; i++) {
      const r = await c.request(ECHO, `tls ${i}`);
      assert.equal(text(r.body), `tls ${i}`);
      assert.equal(r.seq, i + 2);
    }
    c.bye();
    // A client that does not trust the certificate does not get in.
    const bad = new GatewayClient({ tcp: { host: "127.0.0.1", port: g.port, tls: { servername: "localhost" } } });
    await assert.rejects(bad.connect());
  } finally {
    await g.stop();
  }
});

test("RESUME_GAP is reported to the app, which goes on after a new login", async () => {
  const g = await startGateway({ ws: true, outboxFrames: 4 });
  const proxy = new Proxy(g.wsPort!);
  await proxy.listen();
  try {
    const c = new GatewayClient({ url: `ws://127.0.0.1:${proxy.port}/ws`, reconnect: { minMs: 50, maxMs: 100 } });
    const gaps: GapInfo[] = [];
    const got: string[] = [];
    c.on("gap", (x) => gaps.push(x));
    c.on("push", (p) => got.push(text(p.body)));
    await c.connect();
    await c.login(LOGIN, "301");
    await push(g, 301, "before");
    await until(() => got.length === 1, 5000, "the first push");
    // Away long enough for ten pushes: the outbox keeps four.
    proxy.cut(1500);
    await sleep(100);
    for (let i = 0; i < 10; i++) await push(g, 301, `away ${i}`);
    await until(() => gaps.length >= 2, 10000, "the gaps");
    assert.equal(gaps[0].reason, "RESUME_GAP");
    assert.equal(gaps[1].reason, "SESSION_GAP");
    // The login again gets what the outbox kept: the last four.
    await until(() => got.length >= 5, 5000, "the kept pushes");
    assert.deepEqual(got.slice(1), ["away 6", "away 7", "away 8", "away 9"]);
    assert.equal(text((await c.request(ECHO, "on")).body), "on");
    c.bye();
  } finally {
    await proxy.close();
    await g.stop();
  }
});

test("REDIRECT after POST /v1/migrate is followed without the app noticing", async (t) => {
  const redis = await startRedis();
  if (!redis) {
    t.skip("redis-server not installed");
    return;
  }
  const a = await startGateway({ ws: true, cluster: { redisPort: redis.port, id: "gw-a" } });
  const b = await startGateway({ ws: true, cluster: { redisPort: redis.port, id: "gw-b" } });
  try {
    await sleep(300);
    for (const over of ["websocket", "tcp"] as const) {
      const player = over === "tcp" ? 401 : 402;
      const c = new GatewayClient(over === "tcp" ? { tcp: { host: a.host, port: a.port } } : { url: a.wsUrl! });
      const redirects: string[] = [];
      const got: string[] = [];
      c.on("redirect", (r) => redirects.push(r.address));
      c.on("push", (p) => got.push(text(p.body)));
      await c.connect();
      await c.login(LOGIN, String(player));
      for (let i = 0; i < 5; i++) assert.equal(text((await c.request(ECHO, `a${i}`)).body), `a${i}`);
      await push(a, player, "on a");
      const m = await httpCall(a.httpPort, "POST", `/v1/migrate?player=${player}&to=gw-b`);
      assert.equal(m.status, 200, m.text);
      // The app just goes on: requests and pushes keep coming, in order.
      for (let i = 0; i < 5; i++) assert.equal(text((await c.request(ECHO, `b${i}`)).body), `b${i}`);
      await push(b, player, "on b");
      await until(() => got.length === 2, 5000, "both pushes");
      assert.deepEqual(got, ["on a", "on b"]);
      assert.deepEqual(redirects, [over === "tcp" ? `127.0.0.1:${b.port}` : b.wsUrl!]);
      assert.equal(c.last, 13);
      c.bye();
    }
  } finally {
    await a.stop();
    await b.stop();
    redis.stop();
  }
});
