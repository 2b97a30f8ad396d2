// Svelte 5 bindings for FORGE live queries (forge-codegen). Copied unchanged next to api.ts
// by `forge-node generate ts --frontend svelte`.
import { readable, type Readable } from "svelte/store";
import type { BoundQuery, ForgeError } from "./runtime";

export interface QueryState<R> {
  /** the latest result (undefined until the first one arrives) */
  readonly data: R | undefined;
  /** set when the subscription ended with an error */
  readonly error: ForgeError | undefined;
  /** true until the first result (or error) for the current arguments */
  readonly loading: boolean;
}

/** A live query inside a component: `const todos = useQuery(api.list_todos, () => ({ owner }))`.
 *  Arguments are read reactively: when they change the query is subscribed again. */
export function useQuery<A, R>(query: BoundQuery<A, R>, args: () => A): QueryState<R> {
  let data = $state.raw<R | undefined>(undefined);
  let error = $state.raw<ForgeError | undefined>(undefined);
  let loading = $state(true);
  $effect(() => {
    const current = args();
    loading = true;
    return query.client.subscribe(query, current, {
      data: (value) => { data = value; error = undefined; loading = false; },
      error: (err) => { error = err; loading = false; },
    });
  });
  return {
    get data() { return data; },
    get error() { return error; },
    get loading() { return loading; },
  };
}

/** The same as a `svelte/store` readable, for use outside components or with `$store` syntax. */
export function queryStore<A, R>(query: BoundQuery<A, R>, args: A): Readable<QueryState<R>> {
  return readable<QueryState<R>>({ data: undefined, error: undefined, loading: true }, (set) =>
    query.client.subscribe(query, args, {
      data: (value) => set({ data: value, error: undefined, loading: false }),
      error: (err) => set({ data: undefined, error: err, loading: false }),
    }));
}
