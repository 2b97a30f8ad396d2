// A consumer of the client generated for plugins/forge-codegen/tests/apps/cg_app.py: compiles under
// tsc --strict, and every @ts-expect-error line must be an error (tsc reports unused ones).
import { connect, ForgeError, type Item } from "./generated/api";

const api = connect({ url: "http://127.0.0.1:8080", token: () => "token" });

export async function uses(): Promise<number> {
  const items: Item[] = await api.list_items();
  const added: Item = await api.add_item({ title: "milk" });
  const text: string = await api.echo({ text: "a", times: 2 });
  const once: string = await api.echo({ text: "a" });
  const nothing: null = await api.missing();
  const unsubscribe: () => void = api.list_items.client.subscribe(api.list_items, {}, {
    data: (rows: Item[]) => rows.length,
    error: (e: ForgeError) => e.code,
  });
  unsubscribe();
  try {
    await api.echo({ text: "x" });
  } catch (e) {
    if (e instanceof ForgeError && e.is("INVALID_ARGUMENT")) return e.details?.length ?? 0;
    if (e instanceof ForgeError && e.is("RATE_LIMITED")) return e.details?.retry_after ?? 0;
  }

  // @ts-expect-error wrong argument type
  await api.add_item({ title: 5 });
  // @ts-expect-error missing field
  await api.add_item({});
  // @ts-expect-error no arguments at all for a function that needs one
  await api.add_item();
  // @ts-expect-error unknown argument
  await api.echo({ text: "a", loud: true });
  // @ts-expect-error unknown function
  await api.list_itemz();
  // @ts-expect-error a result field that does not exist
  added.priority;
  // @ts-expect-error the result is a string, not a number
  const wrong: number = await api.echo({ text: "a" });
  // @ts-expect-error only queries can be subscribed to
  api.add_item.client.subscribe(api.add_item, { title: "x" }, { data: () => undefined });
  // @ts-expect-error an error code FORGE does not have
  if (e instanceof ForgeError && e.is("TEAPOT")) return 0;
  return items.length + text.length + once.length + (nothing === null ? 0 : 1) + wrong;
}
const e: unknown = null;
