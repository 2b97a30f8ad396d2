// Runes the Svelte bindings test needs outside a component (compiled by svelte/compiler like the bindings).
export function box(value) {
  let current = $state(value);
  return { get value() { return current; }, set value(v) { current = v; } };
}

export function root(fn) {
  return $effect.root(fn);
}
