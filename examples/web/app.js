// The example page's logic: plain JavaScript on the SDK's build output
// (clients/typescript: `npm run build` first).
import { GatewayClient } from "../../clients/typescript/dist/src/index.js";

const $ = (id) => document.getElementById(id);
const text = (b) => new TextDecoder().decode(b);
const params = new URLSearchParams(location.search);
if (params.get("url")) $("url").value = params.get("url");
if (params.get("player")) $("player").value = params.get("player");

let client;

function line(list, s) {
  const li = document.createElement("li");
  li.textContent = s;
  $(list).appendChild(li);
  li.scrollIntoView({ block: "nearest" });
}

function status(s) {
  $("status").textContent = s;
}

async function start() {
  $("connect").disabled = true;
  client = new GatewayClient({ url: $("url").value });
  client.on("push", (p) => {
    line("pushes", `#${p.seq} msg ${p.msgId}: ${text(p.body)}`);
    line("stream", `${p.seq} PUSH ${text(p.body)}`);
    $("seq").textContent = String(client.last);
  });
  client.on("response", (r) => {
    line("stream", `${r.seq} RESPONSE req ${r.reqId}: ${text(r.body)}`);
    $("seq").textContent = String(client.last);
  });
  client.on("session", (s) => line("log", s.resumed ? `resumed at seq ${s.resumePoint}` : `logged in as ${s.player}`));
  client.on("disconnected", (d) => {
    status("reconnecting");
    line("log", `disconnected: ${d.why}`);
  });
  client.on("reconnecting", (r) => line("log", `reconnect attempt ${r.attempt} in ${r.delayMs} ms`));
  client.on("gap", (g) => line("log", `messages may have been missed (${g.reason})`));
  client.on("redirect", (r) => line("log", `redirected to ${r.address}`));
  client.on("kick", (k) => line("log", `kicked: ${k.name}`));
  client.on("closed", (c) => {
    status(`closed (${c.why})`);
    $("connect").disabled = false;
    $("echo").disabled = true;
    $("bye").disabled = true;
  });
  client.on("session", (s) => status(`logged in as ${s.player}`));
  try {
    status("connecting");
    await client.connect();
    const s = await client.login(1, $("player").value);
    status(`logged in as ${s.player}`);
    $("seq").textContent = String(client.last);
    $("echo").disabled = false;
    $("bye").disabled = false;
  } catch (e) {
    status(`failed: ${e.message}`);
    client.close();
    $("connect").disabled = false;
  }
}

$("connect").onclick = start;
$("bye").onclick = () => client?.bye();
$("echo").onclick = async () => {
  const r = await client.request(100, $("echo-body").value);
  line("log", `echo answered with code ${r.code}`);
};
if (params.get("autostart")) start();
