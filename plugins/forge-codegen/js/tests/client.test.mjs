// The generated client against a real FORGE node (started by pytest: plugins/forge-codegen/tests/test_cg_client.py).
// FORGE_CLIENT: the bundled api.ts; FORGE_URL: the node; FORGE_JWT_SECRET: its [gateway] jwt_secret.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import net from "node:net";

const { connect, createApi, ForgeClient, ForgeError, ERROR_STATUS } = await import(process.env.FORGE_CLIENT);
const URL = process.env.FORGE_URL;
const SECRET = process.env.FORGE_JWT_SECRET;

const b64 = (v) => Buffer.from(typeof v === "string" ? v : JSON.stringify(v)).toString("base64url");
function jwt(sub, seconds = 600, roles = []) {
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ sub, roles, exp: Math.floor(Date.now() / 1000) + seconds, iat: Math.floor(Date.now() / 1000) });
  const sig = createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

async function rejects(promise, code, status) {
  try {
    await promise;
  } catch (e) {
    assert.ok(e instanceof ForgeError, `expected a ForgeError, got ${e}`);
    assert.equal(e.code, code, e.message);
    assert.equal(e.status, status);
    assert.ok(e.is(code));
    return e;
  }
  assert.fail(`expected ${code}`);
}

async function eventually(check, what, timeout = 20000) {
  const end = Date.now() + timeout;
  for (;;) {
    const v = check();
    if (v) return v;
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A WebSocket that records the types of the frames it receives and sends. */
function recordingSocket(log) {
  return class extends WebSocket {
    constructor(url) {
      super(url);
      this.addEventListener("message", (ev) => log.push(["in", JSON.parse(ev.data).type]));
    }
    send(data) {
      log.push(["out", JSON.parse(data).type]);
      super.send(data);
    }
  };
}

/** A TCP proxy in front of the node: connections can be cut, or frozen (kept open, forwarding nothing). */
async function proxy(target) {
  const { hostname, port } = new globalThis.URL(target);
  const conns = new Set();
  let frozen = false;
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), hostname);
    const pair = { client, upstream };
    conns.add(pair);
    client.on("data", (d) => { if (!frozen) upstream.write(d); });
    upstream.on("data", (d) => { if (!frozen) client.write(d); });
    const end = () => { client.destroy(); upstream.destroy(); conns.delete(pair); };
    client.on("close", end); upstream.on("close", end);
    client.on("error", end); upstream.on("error", end);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    cut() { for (const { client, upstream } of conns) { client.destroy(); upstream.destroy(); } conns.clear(); },
    freeze(on) { frozen = on; },
    get open() { return conns.size; },
    close() { this.cut(); server.close(); },
  };
}

// --- RPC: every documented error code ----------------------------------------------------------------
test("a call returns the typed result", async () => {
  const api = connect({ url: URL });
  assert.equal(await api.echo({ text: "ab", times: 2 }), "abab");
  assert.equal(await api.echo({ text: "ab" }), "ab");
  const user = connect({ url: URL, token: () => jwt("ann") });
  const item = await user.add_item({ title: "first" });
  assert.equal(item.title, "first");
  assert.equal(item.owner, "ann");
  assert.equal(typeof item.id, "number");
});

test("every documented error code arrives as a ForgeError with its code, status and details", async () => {
  const anon = connect({ url: URL });
  const user = connect({ url: URL, token: () => jwt("bob") });
  const bad = await rejects(anon.echo({ text: 5 }), "INVALID_ARGUMENT", 400);
  assert.deepEqual(bad.details.map((p) => p.argument), ["text"]);
  await rejects(anon.list_items(), "UNAUTHENTICATED", 401);
  await rejects(connect({ url: URL, token: "not-a-token" }).echo({ text: "x" }), "UNAUTHENTICATED", 401);
  await rejects(user.admin_only(), "FORBIDDEN", 403);
  await rejects(anon.missing(), "NOT_FOUND", 404);
  await rejects(new ForgeClient({ url: URL }).call({ ref: { name: "no_such_function" } }, {}), "NOT_FOUND", 404);
  await rejects(anon.clash(), "CONFLICT", 409);
  const big = await rejects(anon.echo({ text: "x".repeat(70000) }), "PAYLOAD_TOO_LARGE", 413);
  assert.equal(typeof big.details.limit, "number");
  await anon.limited();
  const limited = await rejects(anon.limited(), "RATE_LIMITED", 429);
  assert.ok(limited.details.retry_after > 0);
  const internal = await rejects(anon.boom(), "INTERNAL", 500);
  assert.ok(!internal.message.includes("hunter2"), internal.message);
  assert.equal(typeof internal.details.request_id, "string");
  assert.equal(internal.requestId, internal.details.request_id);
  await rejects(anon.slow(), "TIMEOUT", 504);
  // no node there at all
  const down = await rejects(connect({ url: "http://127.0.0.1:9" }).echo({ text: "x" }), "UNAVAILABLE", 0);
  assert.match(down.message, /cannot reach/);
  // a node that answers 503 UNAVAILABLE (no node can run the function now)
  const fetch503 = async () => new Response(JSON.stringify({ error: { code: "UNAVAILABLE", message: "no node", details: null } }),
    { status: 503, headers: { "content-type": "application/json" } });
  await rejects(connect({ url: URL, fetch: fetch503 }).echo({ text: "x" }), "UNAVAILABLE", 503);
  // a proxy's HTML error page: the status decides the code
  const fetchHtml = async () => new Response("<h1>bad gateway</h1>", { status: 504 });
  await rejects(connect({ url: URL, fetch: fetchHtml }).echo({ text: "x" }), "TIMEOUT", 504);
  assert.deepEqual(Object.keys(ERROR_STATUS).sort(), ["CONFLICT", "FORBIDDEN", "INTERNAL", "INVALID_ARGUMENT", "NOT_FOUND",
    "PAYLOAD_TOO_LARGE", "RATE_LIMITED", "TIMEOUT", "UNAUTHENTICATED", "UNAVAILABLE"]);
});

// --- live queries -------------------------------------------------------------------------------------
test("a subscription receives its first result and every change", async (t) => {
  const api = connect({ url: URL, token: () => jwt("carol") });
  t.after(() => api.list_items.client.close());
  const seen = [];
  const stop = api.list_items.client.subscribe(api.list_items, {}, { data: (v) => seen.push(v), error: (e) => seen.push(e) });
  await eventually(() => seen.length === 1, "the first result");
  assert.deepEqual(seen[0], []);
  await api.add_item({ title: "one" });
  await eventually(() => seen.length === 2, "the update");
  assert.deepEqual(seen[1].map((i) => i.title), ["one"]);
  stop();
});

test("a subscription that is refused ends with a typed error", async (t) => {
  const api = connect({ url: URL }); // anonymous: list_items needs a caller
  t.after(() => api.list_items.client.close());
  const errors = [];
  api.list_items.client.subscribe(api.list_items, {}, { data: () => assert.fail("no data expected"), error: (e) => errors.push(e) });
  await eventually(() => errors.length === 1, "the error");
  assert.ok(errors[0] instanceof ForgeError);
  assert.equal(errors[0].code, "UNAUTHENTICATED");
});

test("a killed socket reconnects and resumes without a second full result", async (t) => {
  const px = await proxy(URL);
  const log = [];
  const client = new ForgeClient({ url: px.url, token: () => jwt("dave"), WebSocket: recordingSocket(log), minBackoff: 20, maxBackoff: 200 });
  t.after(() => { client.close(); px.close(); });
  const api = createApi(client);
  const seen = [];
  client.subscribe(api.list_items, {}, { data: (v) => seen.push(v), error: (e) => assert.fail(String(e)) });
  await eventually(() => seen.length === 1, "the first result");
  px.cut();
  await eventually(() => log.filter(([d, t]) => d === "in" && t === "unchanged").length === 1, "the resumed subscription");
  assert.equal(client.connects, 2);
  assert.equal(log.filter(([d, t]) => d === "in" && t === "data").length, 1, JSON.stringify(log));
  assert.equal(seen.length, 1);
  // and it is live again
  await connect({ url: URL, token: () => jwt("dave") }).add_item({ title: "after" });
  await eventually(() => seen.length === 2, "an update after the reconnect");
  assert.deepEqual(seen[1].map((i) => i.title), ["after"]);
});

test("a 2 s token is refreshed on the open socket without losing the subscription", async (t) => {
  const log = [];
  let minted = 0;
  const client = new ForgeClient({ url: URL, token: () => { minted++; return jwt("erin", 2); }, WebSocket: recordingSocket(log) });
  t.after(() => client.close());
  const api = createApi(client);
  const seen = [];
  const errors = [];
  client.subscribe(api.list_items, {}, { data: (v) => seen.push(v), error: (e) => errors.push(e) });
  await eventually(() => seen.length === 1, "the first result");
  await new Promise((r) => setTimeout(r, 4500)); // past two expiries of the first token
  const writer = connect({ url: URL, token: () => jwt("erin") });
  await writer.add_item({ title: "late" });
  await eventually(() => seen.length === 2, "an update after the first token expired");
  assert.deepEqual(errors, []);
  assert.equal(client.connects, 1);
  assert.ok(log.filter(([d, t]) => d === "out" && t === "auth").length >= 3, JSON.stringify(log));
  assert.ok(minted >= 3);
});

test("a connection that stops answering is detected by ping and replaced", async (t) => {
  const px = await proxy(URL);
  const seen = [];
  // openTimeout: the reconnect made while the path is still frozen never completes its handshake
  const client = new ForgeClient({ url: px.url, token: () => jwt("fay"), pingInterval: 200, pongTimeout: 300,
                                   openTimeout: 500, minBackoff: 20, maxBackoff: 100 });
  t.after(() => { client.close(); px.close(); });
  const api = createApi(client);
  client.subscribe(api.list_items, {}, { data: (v) => seen.push(v) });
  await eventually(() => seen.length === 1, "the first result");
  px.freeze(true); // TCP stays up, nothing comes back
  await eventually(() => client.connects >= 2, "a new connection");
  px.freeze(false);
  await connect({ url: URL, token: () => jwt("fay") }).add_item({ title: "x" });
  await eventually(() => seen.length === 2, "an update on the new connection");
});

test("reconnect attempts back off exponentially", async () => {
  const opened = [];
  class Refused {
    constructor() {
      this.readyState = 0;
      opened.push(Date.now());
      setTimeout(() => this.onclose?.({ code: 1006, reason: "" }), 0);
    }
    send() {}
    close() {}
  }
  const realRandom = Math.random;
  Math.random = () => 1; // the full-jitter delay at its upper bound
  try {
    const client = new ForgeClient({ url: "http://127.0.0.1:9", WebSocket: Refused, minBackoff: 20, maxBackoff: 160 });
    client.subscribe({ ref: { name: "q", kind: "query" } }, {}, { data() {} });
    await eventually(() => opened.length >= 6, "six attempts", 10000);
    client.close();
  } finally {
    Math.random = realRandom;
  }
  const gaps = opened.slice(1).map((t, i) => t - opened[i]);
  [20, 40, 80, 160, 160].forEach((least, i) => assert.ok(gaps[i] >= least - 2, `gap ${i} was ${gaps[i]} ms, expected >= ${least}`));
});
