import { test } from "node:test";
import assert from "node:assert/strict";
import { compareIds, isInboxId, backoffDelay } from "../../dist/index.js";
import { maxId } from "../../dist/ids.js";
import { readClaims } from "../../dist/jwt.js";
import { jwt } from "./helpers.mjs";

test("inbox ids compare numerically, not as strings", () => {
  assert.equal(compareIds("9-0", "10-0"), -1);
  assert.equal(compareIds("1732530000000-10", "1732530000000-9"), 1);
  assert.equal(compareIds("1732530000000", "1732530000000-0"), 0);
  assert.equal(compareIds("1732530000001-0", "1732530000000-99"), 1);
  assert.equal(maxId(undefined, "5-1"), "5-1");
  assert.equal(maxId("5-1", "5-0"), "5-1");
  assert.equal(maxId("garbage", "5-0"), "5-0");
});

test("inbox id shape", () => {
  for (const ok of ["0", "1-0", "1732530000000-0", "18446744073709551615-18446744073709551615"]) {
    assert.ok(isInboxId(ok), ok);
  }
  for (const bad of ["", "-", "1-", "a-1", "1-2-3", " 1-0", 5, null, undefined]) {
    assert.ok(!isInboxId(bad), String(bad));
  }
  assert.throws(() => compareIds("x", "1-0"), TypeError);
});

test("full-jitter backoff: random(0, min(cap, base * 2^attempt))", () => {
  const opts = { base: 500, cap: 30_000 };
  assert.equal(backoffDelay(0, opts, () => 0.999999), 499);
  assert.equal(backoffDelay(3, opts, () => 0.5), 2000);
  assert.equal(backoffDelay(10, opts, () => 0.5), 15_000);
  assert.equal(backoffDelay(1000, opts, () => 0.5), 15_000);
  assert.equal(backoffDelay(4, opts, () => 0), 0);
});

test("token claims are read best-effort", () => {
  assert.deepEqual(readClaims(jwt({ sub: "42", exp: 1700000000, topics: ["a"] })), { sub: "42", exp: 1700000000 });
  assert.deepEqual(readClaims("alice"), {});
  assert.deepEqual(readClaims("a.b.c"), {});
});
