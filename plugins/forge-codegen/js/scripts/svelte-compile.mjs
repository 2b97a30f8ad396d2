// node svelte-compile.mjs IN OUT: compile a Svelte component (.svelte) or module (.svelte.ts/.svelte.js)
// as the Svelte toolchain does (TypeScript types stripped first for .ts modules). Prints the compiler's
// warnings as JSON lines; exits 1 on any warning or error.
import { readFileSync, writeFileSync } from "node:fs";
import { compile, compileModule } from "svelte/compiler";
import ts from "typescript";

const [input, output] = process.argv.slice(2);
const source = readFileSync(input, "utf8");
let result;
try {
  if (input.endsWith(".svelte")) {
    result = compile(source, { filename: input, generate: "client", runes: true });
  } else {
    const js = input.endsWith(".ts")
      ? ts.transpileModule(source, { fileName: input, compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ESNext, verbatimModuleSyntax: true } }).outputText
      : source;
    result = compileModule(js, { filename: input, generate: "client" });
  }
} catch (e) {
  console.log(JSON.stringify({ error: String(e.message ?? e), code: e.code, start: e.start }));
  process.exit(1);
}
for (const w of result.warnings) console.log(JSON.stringify({ warning: w.message, code: w.code, start: w.start }));
writeFileSync(output, result.js.code);
process.exit(result.warnings.length ? 1 : 0);
