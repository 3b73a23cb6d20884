// Copies the built client (dist/*.js) into examples/browser/herald/, so the demo page works
// from any static file server without a build step. Those copies are committed; CI rebuilds
// and checks they are unchanged (scripts/test.sh).
import { mkdirSync, readdirSync, copyFileSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(dirname(fileURLToPath(import.meta.url)));
const dist = join(root, "dist");
const dest = join(root, "..", "..", "examples", "browser", "herald");
rmSync(dest, { recursive: true, force: true });
mkdirSync(dest, { recursive: true });
for (const f of readdirSync(dist)) {
  if (f.endsWith(".js")) copyFileSync(join(dist, f), join(dest, f));
}
console.log(`copied the built client to ${dest}`);
