// The Svelte 5 bindings (useQuery, queryStore) driven through a fake WebSocket: no browser, no server.
// FORGE_SVELTE_BUNDLE: the compiled bindings + runtime + svelte, bundled by the pytest test.
import { test } from "node:test";
import assert from "node:assert/strict";

const { useQuery, queryStore, box, root, flushSync, get, ForgeClient, bindApi, fn } = await import(process.env.FORGE_SVELTE_BUNDLE);

/** A fake server end: records what the client sends, lets the test answer. */
class FakeSocket {
  static last = null;
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.last = this;
    queueMicrotask(() => { this.readyState = 1; this.onopen?.({}); });
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close() { this.readyState = 3; }
  reply(msg) { this.onmessage?.({ data: JSON.stringify(msg) }); }
  of(type) { return this.sent.filter((m) => m.type === type); }
}

const tick = () => new Promise((r) => setTimeout(r, 0));

function api(t) {
  const client = new ForgeClient({ url: "http://fake", WebSocket: FakeSocket });
  t.after(() => client.close());
  return { client, ...bindApi(client, { todos: fn("todos", "query") }) };
}

test("useQuery: loading, data, changed arguments resubscribe, errors, cleanup", async (t) => {
  const { todos } = api(t);
  const owner = box("ann");
  let state;
  const stop = root(() => { state = useQuery(todos, () => ({ owner: owner.value })); });
  flushSync();
  assert.equal(state.loading, true);
  assert.equal(state.data, undefined);
  await tick();
  const ws = FakeSocket.last;
  assert.deepEqual(ws.of("subscribe").map((m) => [m.function, m.args]), [["todos", { owner: "ann" }]]);
  const first = ws.of("subscribe")[0].id;
  ws.reply({ type: "data", id: first, hash: "h1", position: 1, data: ["a"] });
  flushSync();
  assert.deepEqual(state.data, ["a"]);
  assert.equal(state.loading, false);
  ws.reply({ type: "data", id: first, hash: "h2", position: 2, data: ["a", "b"] });
  flushSync();
  assert.deepEqual(state.data, ["a", "b"]);

  owner.value = "bob"; // new arguments: the old subscription ends, a new one starts
  flushSync();
  assert.equal(state.loading, true);
  assert.deepEqual(ws.of("unsubscribe").map((m) => m.id), [first]);
  const second = ws.of("subscribe")[1];
  assert.deepEqual(second.args, { owner: "bob" });
  ws.reply({ type: "error", id: second.id, code: "FORBIDDEN", message: "not yours", details: null });
  flushSync();
  assert.equal(state.loading, false);
  assert.equal(state.error.code, "FORBIDDEN");
  assert.ok(state.error.is("FORBIDDEN"));

  stop(); // component gone: nothing left subscribed (the failed one ended on the server already)
  flushSync();
  assert.equal(ws.of("unsubscribe").length, 1);
});

test("useQuery unsubscribes when its owner is destroyed", async (t) => {
  const { todos } = api(t);
  let state;
  const stop = root(() => { state = useQuery(todos, () => ({})); });
  flushSync();
  await tick();
  const ws = FakeSocket.last;
  const id = ws.of("subscribe")[0].id;
  ws.reply({ type: "data", id, hash: "h", position: 1, data: 1 });
  flushSync();
  assert.equal(state.data, 1);
  stop();
  assert.deepEqual(ws.of("unsubscribe").map((m) => m.id), [id]);
});

test("queryStore: a svelte/store readable that subscribes while it has subscribers", async (t) => {
  const { todos } = api(t);
  const store = queryStore(todos, { done: false });
  const seen = [];
  const unsubscribe = store.subscribe((v) => seen.push(v));
  await tick();
  const ws = FakeSocket.last;
  const id = ws.of("subscribe")[0].id;
  assert.deepEqual(ws.of("subscribe")[0].args, { done: false });
  ws.reply({ type: "data", id, hash: "h", position: 1, data: [1, 2] });
  assert.deepEqual(get(store).data, [1, 2]); // the store's current value while it has a subscriber
  assert.deepEqual(seen.map((s) => [s.loading, s.data]), [[true, undefined], [false, [1, 2]]]);
  unsubscribe();
  assert.ok(ws.of("unsubscribe").some((m) => m.id === id));
});
