import { test } from "node:test";
import assert from "node:assert/strict";
import { luhnValid, redactPii, type PiiKind } from "./pii.js";

/** [input, expected output, kinds found] */
type Row = [string, string, PiiKind[]];

const EMAILS: Row[] = [
  ["mail alice@example.com please", "mail [email] please", ["email"]],
  ["Bob.Smith+tag@sub.example.co.uk.", "[email].", ["email"]],
  ["<first_last@example-mail.org>", "<[email]>", ["email"]],
  ["jörg.müller@beispiel.de schrieb", "[email] schrieb", ["email"]],
  ["two: a@b.io, c.d@e.fr", "two: [email], [email]", ["email"]],
  ["mailto:x.y@corp.example", "mailto:[email]", ["email"]],
  ["call me at 555-123-4567 or me@x.com", "call me at [phone] or [email]", ["email", "phone"]],
  // Digits inside an address must not be left behind as a phone number.
  ["user5551234567@example.com", "[email]", ["email"]],
];

const PHONES: Row[] = [
  ["call +1 (555) 123-4567 now", "call [phone] now", ["phone"]],
  ["+44 20 7946 0958", "[phone]", ["phone"]],
  ["ring +33612345678.", "ring [phone].", ["phone"]],
  ["+49 30 1234567", "[phone]", ["phone"]],
  ["+44 (0)20 7946 0958", "[phone]", ["phone"]],
  ["+91-98765-43210", "[phone]", ["phone"]],
  ["(555) 123-4567", "[phone]", ["phone"]],
  ["555-123-4567", "[phone]", ["phone"]],
  ["555.123.4567", "[phone]", ["phone"]],
  ["my number is 555 123 4567, thanks", "my number is [phone], thanks", ["phone"]],
  ["06 12 34 56 78", "[phone]", ["phone"]],
  ["020 7946 0958", "[phone]", ["phone"]],
  ["030 1234567", "[phone]", ["phone"]],
  ["0612345678", "[phone]", ["phone"]],
  ["07911123456", "[phone]", ["phone"]],
  ["dial 555-1234", "dial [phone]", ["phone"]],
  ["612 345 678", "[phone]", ["phone"]],
  ["call 555-123-4567 2 times", "call [phone] 2 times", ["phone"]],
  ["option 1 555-123-4567", "option 1 [phone]", ["phone"]],
  ["555-123-4567 4111111111111111", "[phone] [card]", ["card", "phone"]],
];

const CARDS: Row[] = [
  ["card 4111 1111 1111 1111 exp 12/26", "card [card] exp 12/26", ["card"]],
  ["4111-1111-1111-1111", "[card]", ["card"]],
  ["4111111111111111", "[card]", ["card"]],
  ["amex 3782 822463 10005", "amex [card]", ["card"]],
  ["mc 5555555555554444.", "mc [card].", ["card"]],
  ["discover 6011 0009 9013 9424", "discover [card]", ["card"]],
  ["visa 4222222222222", "visa [card]", ["card"]],
  ["ref 12 4111 1111 1111 1111", "ref 12 [card]", ["card"]],
  ["then 4111 1111 1111 1111 2 more", "then [card] 2 more", ["card"]],
];

const IPS: Row[] = [
  ["from 192.168.1.23 today", "from [ip] today", ["ip"]],
  ["10.0.0.1:8080", "[ip]:8080", ["ip"]],
  ["host 8.8.8.8.", "host [ip].", ["ip"]],
  ["v6 2001:db8:85a3::8a2e:370:7334 ok", "v6 [ip] ok", ["ip"]],
  ["2001:0db8:0000:0000:0000:ff00:0042:8329", "[ip]", ["ip"]],
  ["link fe80::1ff:fe23:4567:890a%eth0", "link [ip]", ["ip"]],
  ["mapped ::ffff:192.0.2.128 here", "mapped [ip] here", ["ip"]],
  ["connect to 2001:db8::1.", "connect to [ip].", ["ip"]],
];

/** Text that must come out unchanged. */
const NEGATIVES: string[] = [
  "in 2024 I bought 3 apples",
  "what happened in 1969",
  "top 10 movies of 2023",
  "meeting on 2024-01-15 at 10:30",
  "on 2024-01-15 10:30:00",
  "deadline 15.01.2024",
  "born 01/15/1990",
  "from 1990-2000",
  "the time is 12:30:45",
  "price $1,299.99 or 1,000,000 total",
  "population 1 000 000",
  "budget 2 000 000 000 and 3.000.000.000",
  "pi is 3.14159265",
  "upgrade to v1.2.3 or 10.0.19041",
  "epoch 1700000000 and 1700000000000 ms",
  "order #12345678 shipped",
  "uuid 550e8400-e29b-41d4-a716-446655440000",
  "sha 3f786850e387550fdab836ed7e6dc881de23001b",
  "std::vector<int> and a :: b",
  "mac 00:1A:2B:3C:4D:5E",
  "4111 1111 1111 1112 is not a valid card",
  "0000 0000 0000 0000",
  "@mention and user@localhost",
  "isbn 978-3-16-148410-0",
  "room 101, floor 3, 20 people",
  "ratio 16:9 and 4:3",
  "width 1920 x 1080",
  "12 34 56",
];

for (const [group, rows] of Object.entries({ EMAILS, PHONES, CARDS, IPS })) {
  test(`redactPii redacts ${group.toLowerCase()}`, () => {
    for (const [input, expected, kinds] of rows) {
      const r = redactPii(input);
      assert.equal(r.text, expected, `input: ${JSON.stringify(input)}`);
      assert.deepEqual([...r.found].sort(), [...kinds].sort(), `kinds for ${JSON.stringify(input)}`);
    }
  });
}

test("redactPii leaves ordinary numbers, dates, versions and identifiers alone", () => {
  for (const input of NEGATIVES) {
    const r = redactPii(input);
    assert.equal(r.text, input, `changed: ${JSON.stringify(input)} → ${JSON.stringify(r.text)}`);
    assert.deepEqual(r.found, []);
  }
});

test("redactPii honours disabled kinds", () => {
  const text = "a@b.io 555-123-4567 4111111111111111 10.1.2.3";
  assert.equal(redactPii(text).text, "[email] [phone] [card] [ip]");
  assert.equal(redactPii(text, { emails: false }).text, "a@b.io [phone] [card] [ip]");
  assert.equal(redactPii(text, { phones: false }).text, "[email] 555-123-4567 [card] [ip]");
  assert.equal(redactPii(text, { cards: false, ips: false, phones: false }).text, "[email] 555-123-4567 4111111111111111 10.1.2.3");
  assert.deepEqual(redactPii(text, { emails: false, phones: false, cards: false, ips: false }), { text, found: [] });
});

test("redactPii finds PII with the fewest digits each kind can have (the digit-count guards)", () => {
  // 13-digit card, 7-digit local phone, 4-digit IPv4: the smallest of each kind.
  assert.deepEqual(redactPii("visa 4222222222222 ok"), { text: "visa [card] ok", found: ["card"] });
  assert.deepEqual(redactPii("ring 555-1234 now"), { text: "ring [phone] now", found: ["phone"] });
  assert.deepEqual(redactPii("host 1.2.3.4 down"), { text: "host [ip] down", found: ["ip"] });
  // Digits spread over the text count towards no single candidate.
  assert.deepEqual(redactPii("v1 of 2 in 3 by 4 at 5 to 6 on 7 for 8 up 9 and 10 to 11 12 13"), {
    text: "v1 of 2 in 3 by 4 at 5 to 6 on 7 for 8 up 9 and 10 to 11 12 13",
    found: [],
  });
});

test("redactPii stays fast on adversarial input (no catastrophic backtracking)", () => {
  const inputs = [
    "+1 " + "1234567890".repeat(4) + " ",
    "9".repeat(4000),
    "1 ".repeat(2000),
    "1-".repeat(2000),
    "a:".repeat(2000),
    "(1)".repeat(1000),
    "a".repeat(4000) + "@",
    "a.".repeat(2000) + "@b",
  ];
  for (const base of inputs) {
    const text = base.repeat(Math.ceil(65536 / base.length));
    const t = performance.now();
    redactPii(text);
    const ms = performance.now() - t;
    assert.ok(ms < 200, `${JSON.stringify(base.slice(0, 12))}… took ${ms.toFixed(0)} ms`);
  }
});

test("luhnValid", () => {
  for (const ok of ["4111111111111111", "378282246310005", "5555555555554444", "79927398713"]) assert.ok(luhnValid(ok), ok);
  for (const bad of ["4111111111111112", "79927398710", "", "12a4"]) assert.ok(!luhnValid(bad), bad);
});
