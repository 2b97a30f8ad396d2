// Bundled with esbuild (browser conditions) so the test, the bindings and the runtime share one svelte.
export * from "./svelte.js";
export * from "./harness.js";
export * from "./runtime";
export { flushSync } from "svelte";
export { get } from "svelte/store";
