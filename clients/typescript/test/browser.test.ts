// The example page (examples/web) in a real headless browser: Debian's
// Chromium, driven by puppeteer-core (which downloads no browser).

import { test } from "node:test";
import * as assert from "node:assert/strict";
import * as fs from "node:fs";
import * as http from "node:http";
import * as path from "node:path";
import puppeteer from "puppeteer-core";
import { httpCall, ROOT, startGateway } from "./helpers.js";

const TYPES: Record<string, string> = {
  ".html": "text/html",
  ".js": "text/javascript",
  ".map": "application/json",
};

/** Serve the repository's files (the page and the SDK's build output). */
function staticServer(): Promise<{ port: number; close: () => void }> {
  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? "/", "http://x");
    const file = path.normalize(path.join(ROOT, decodeURIComponent(url.pathname)));
    if (!file.startsWith(ROOT) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": TYPES[path.extname(file)] ?? "application/octet-stream" });
    fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve) =>
    server.listen(0, "127.0.0.1", () => {
      const a = server.address();
      resolve({ port: typeof a === "object" && a ? a.port : 0, close: () => server.close() });
    }),
  );
}

test("the example page logs in over WebSocket and shows a push posted over HTTP", async (t) => {
  const chromium = process.env.CHROMIUM ?? "/usr/bin/chromium";
  if (!fs.existsSync(chromium)) {
    if (process.env.CI) throw new Error(`${chromium} is required under CI`);
    t.skip(`no browser at ${chromium}`);
    return;
  }
  const g = await startGateway({ ws: true });
  const files = await staticServer();
  const browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  try {
    const page = await browser.newPage();
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    const q = new URLSearchParams({ url: g.wsUrl!, player: "77", autostart: "1" });
    await page.goto(`http://127.0.0.1:${files.port}/examples/web/index.html?${q}`);
    await page.waitForFunction(() => document.getElementById("status")?.textContent === "logged in as 77", {
      timeout: 15000,
    });
    const r = await httpCall(g.httpPort, "POST", "/v1/push?players=77&msg=7", "hello from http");
    assert.equal(r.status, 200, r.text);
    await page.waitForFunction(() => document.getElementById("pushes")?.textContent?.includes("hello from http"), {
      timeout: 15000,
    });
    const seq = await page.$eval("#seq", (e) => e.textContent);
    assert.equal(seq, "2");
    assert.deepEqual(errors, []);
  } finally {
    await browser.close();
    files.close();
    await g.stop();
  }
});
