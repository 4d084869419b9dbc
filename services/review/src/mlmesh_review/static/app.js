// The reviewers' page: the review service's own gRPC API, called as gRPC-Web
// through Envoy (envoy.filters.http.grpc_web). No library, no build step: a
// small protobuf wire-format codec for the review messages and the gRPC-Web
// framing are below.
//
// Every text from the service is untrusted (model outputs, user reports): the
// DOM is built with createElement and textContent only; nothing is ever
// assigned to innerHTML (the page's Content-Security-Policy enforces Trusted
// Types, so such an assignment would throw).

const SERVICE = "/mlmesh.review.v1.ReviewService/";
const KEY_STORAGE = "mlmesh.review.key";
// Keys are sent as `authorization: Bearer <key>`: visible ASCII, no spaces.
const KEY_PATTERN = /^[\x21-\x7e]{8,512}$/;
const MODEL_PATTERN = /^[a-z][a-z0-9-]{1,62}$/;
const ITEM_NAME_PATTERN = /^items\/[a-z0-9]{1,40}$/;
const DEADLINE = "15S"; // grpc-timeout of every call
const MAX_RESPONSE_BYTES = 64 * 1024 * 1024;

// ---- protobuf wire format ---------------------------------------------------
// A schema maps field numbers to [name, type, sub-schema?, repeated?]. Types:
// "string", "bytes", "enum", "int32", "int64", "bool", "message", "map"
// (a map<string, string>: repeated entries {1: key, 2: value}).

const WIRE_VARINT = 0;
const WIRE_FIXED64 = 1;
const WIRE_LEN = 2;
const WIRE_FIXED32 = 5;

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder("utf-8");

class Writer {
  constructor() {
    this.bytes = [];
  }
  varint(value) {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw new RangeError(`cannot encode ${value} as a varint`);
    }
    while (value > 0x7f) {
      this.bytes.push((value % 128) | 0x80);
      value = Math.floor(value / 128);
    }
    this.bytes.push(value);
  }
  tag(field, wire) {
    this.varint(field * 8 + wire);
  }
  lengthDelimited(field, data) {
    this.tag(field, WIRE_LEN);
    this.varint(data.length);
    for (const b of data) this.bytes.push(b);
  }
  finish() {
    return Uint8Array.from(this.bytes);
  }
}

function encode(schema, message) {
  const w = new Writer();
  for (const [number, [name, type, sub, repeated]] of Object.entries(schema)) {
    const value = message[name];
    if (value === undefined || value === null) continue;
    const values = repeated ? value : [value];
    for (const v of values) encodeField(w, Number(number), type, sub, v, repeated);
  }
  return w.finish();
}

function encodeField(w, number, type, sub, value, repeated) {
  switch (type) {
    case "string":
      if (value !== "" || repeated) w.lengthDelimited(number, utf8.encode(value));
      break;
    case "bytes":
      if (value.length || repeated) w.lengthDelimited(number, value);
      break;
    case "enum":
    case "int32":
    case "int64":
    case "bool":
      if (value || repeated) {
        w.tag(number, WIRE_VARINT);
        w.varint(Number(value));
      }
      break;
    case "message":
      w.lengthDelimited(number, encode(sub, value));
      break;
    case "map":
      for (const [k, v] of Object.entries(value)) {
        w.lengthDelimited(number, encode(MAP_ENTRY, { key: k, value: v }));
      }
      break;
    default:
      throw new TypeError(`unknown field type ${type}`);
  }
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.pos = 0;
  }
  done() {
    return this.pos >= this.bytes.length;
  }
  byte() {
    if (this.pos >= this.bytes.length) throw new RangeError("truncated message");
    return this.bytes[this.pos++];
  }
  // Up to 64 bits; exact to 2^53 (timestamps' seconds, counts), and a
  // negative int32/int64 (ten bytes) comes back as its two's complement,
  // which the review messages never carry.
  varint() {
    let value = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      const b = this.byte();
      value += (b & 0x7f) * scale;
      if (b < 0x80) return value;
      scale *= 128;
    }
    throw new RangeError("varint longer than ten bytes");
  }
  take(length) {
    if (length > this.bytes.length - this.pos) throw new RangeError("truncated field");
    const out = this.bytes.subarray(this.pos, this.pos + length);
    this.pos += length;
    return out;
  }
  skip(wire) {
    switch (wire) {
      case WIRE_VARINT:
        this.varint();
        break;
      case WIRE_FIXED64:
        this.take(8);
        break;
      case WIRE_LEN:
        this.take(this.varint());
        break;
      case WIRE_FIXED32:
        this.take(4);
        break;
      default:
        throw new RangeError(`unsupported wire type ${wire}`);
    }
  }
}

function defaults(schema) {
  const out = {};
  for (const [name, type, , repeated] of Object.values(schema)) {
    if (repeated) out[name] = [];
    else if (type === "string") out[name] = "";
    else if (type === "bytes") out[name] = new Uint8Array(0);
    // No prototype: a key such as "__proto__" (the contract's key pattern
    // allows it) stays an entry the reviewer sees, never the object's parent.
    else if (type === "map") out[name] = Object.create(null);
    else if (type === "message") out[name] = null;
    else if (type === "bool") out[name] = false;
    else out[name] = 0;
  }
  return out;
}

function decode(schema, bytes) {
  const r = new Reader(bytes);
  const out = defaults(schema);
  while (!r.done()) {
    const key = r.varint();
    const number = Math.floor(key / 8);
    const wire = key % 8;
    const field = schema[number];
    if (field === undefined) {
      r.skip(wire); // a field this page does not know: newer contract
      continue;
    }
    const [name, type, sub, repeated] = field;
    let value;
    if (type === "string" || type === "bytes" || type === "message" || type === "map") {
      if (wire !== WIRE_LEN) throw new RangeError(`field ${name}: wire type ${wire}`);
      const data = r.take(r.varint());
      if (type === "string") value = fromUtf8.decode(data);
      else if (type === "bytes") value = data.slice();
      else if (type === "message") value = decode(sub, data);
      else {
        const entry = decode(MAP_ENTRY, data);
        out[name][entry.key] = entry.value;
        continue;
      }
    } else if (wire === WIRE_VARINT) {
      value = r.varint();
      if (type === "bool") value = value !== 0;
    } else if (wire === WIRE_LEN && repeated) {
      // packed repeated scalars
      const packed = new Reader(r.take(r.varint()));
      while (!packed.done()) out[name].push(packed.varint());
      continue;
    } else {
      throw new RangeError(`field ${name}: wire type ${wire}`);
    }
    if (repeated) out[name].push(value);
    else out[name] = value;
  }
  return out;
}

// ---- the messages (mlmesh.review.v1, google.protobuf, google.rpc) ----------

const MAP_ENTRY = { 1: ["key", "string"], 2: ["value", "string"] };
const TIMESTAMP = { 1: ["seconds", "int64"], 2: ["nanos", "int32"] };

const ITEM = {
  1: ["name", "string"],
  2: ["source", "enum"],
  3: ["sourceId", "string"],
  4: ["model", "string"],
  5: ["modelVersion", "string"],
  6: ["alternativeModel", "string"],
  7: ["alternativeVersion", "string"],
  8: ["inputs", "string"],
  9: ["primaryOutput", "string"],
  10: ["alternativeOutput", "string"],
  11: ["context", "map"],
  12: ["requestId", "string"],
  13: ["createTime", "message", TIMESTAMP],
  14: ["state", "enum"],
  15: ["claimHolder", "string"],
  16: ["claimExpireTime", "message", TIMESTAMP],
  17: ["verdict", "enum"],
  18: ["correctLabel", "string"],
  19: ["note", "string"],
  20: ["reviewerKeyId", "string"],
  21: ["decideTime", "message", TIMESTAMP],
  22: ["escalationReason", "string"],
  23: ["submitterKeyId", "string"],
};
const ITEM_RESPONSE = { 1: ["item", "message", ITEM] };

const METHODS = {
  ListItems: {
    request: {
      1: ["state", "enum"],
      2: ["source", "enum"],
      3: ["model", "string"],
      4: ["pageSize", "int32"],
      5: ["pageToken", "string"],
    },
    response: { 1: ["items", "message", ITEM, true], 2: ["nextPageToken", "string"] },
  },
  GetItem: { request: { 1: ["name", "string"] }, response: ITEM_RESPONSE },
  ClaimItem: { request: { 1: ["name", "string"] }, response: ITEM_RESPONSE },
  SubmitVerdict: {
    request: {
      1: ["name", "string"],
      2: ["verdict", "enum"],
      3: ["correctLabel", "string"],
      4: ["note", "string"],
    },
    response: ITEM_RESPONSE,
  },
  EscalateItem: {
    request: { 1: ["name", "string"], 2: ["reason", "string"] },
    response: ITEM_RESPONSE,
  },
};

const ANY = { 1: ["typeUrl", "string"], 2: ["value", "bytes"] };
const RPC_STATUS = {
  1: ["code", "int32"],
  2: ["message", "string"],
  3: ["details", "message", ANY, true],
};
const ERROR_INFO = { 1: ["reason", "string"], 2: ["domain", "string"], 3: ["metadata", "map"] };
const FIELD_VIOLATION = { 1: ["field", "string"], 2: ["description", "string"] };
const BAD_REQUEST = { 1: ["fieldViolations", "message", FIELD_VIOLATION, true] };

const STATES = { 0: "Any", 1: "Open", 2: "Claimed", 3: "Decided", 4: "Escalated" };
const SOURCES = {
  0: "Any",
  1: "Shadow disagreement",
  2: "Low confidence",
  3: "User report",
  4: "Content check",
};
const VERDICTS = {
  1: "Primary output is correct",
  2: "Alternative output is correct",
  3: "Both are correct",
  4: "Both are wrong (give the correct label)",
  5: "Other (see the note)",
};
const ALTERNATIVE_TITLE = {
  1: "Shadow output",
  2: "Runner-up",
  3: "User report",
  4: "Nearest policy example",
};
const CODES = [
  "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
  "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
  "UNAUTHENTICATED",
];

// ---- gRPC-Web ---------------------------------------------------------------
// Request: one frame (flag 0, 4-byte big-endian length, message). Response:
// message frames, then a trailers frame (flag 0x80) of "name:value\r\n"
// lines; a call that fails before any message ("trailers-only") carries
// grpc-status in the HTTP headers instead.

class RpcError extends Error {
  constructor(code, message, details = {}) {
    super(message);
    this.code = code;
    this.codeName = CODES[code] || `code ${code}`;
    this.reason = details.reason || "";
    this.metadata = details.metadata || {};
    this.violations = details.violations || [];
  }
}

function frame(message) {
  const out = new Uint8Array(5 + message.length);
  new DataView(out.buffer).setUint32(1, message.length);
  out.set(message, 5);
  return out;
}

function parseFrames(bytes) {
  const messages = [];
  let trailers = null;
  let pos = 0;
  while (pos < bytes.length) {
    if (bytes.length - pos < 5) throw new RpcError(13, "truncated gRPC-Web frame");
    const flags = bytes[pos];
    const length = new DataView(bytes.buffer, bytes.byteOffset + pos + 1, 4).getUint32(0);
    if (length > bytes.length - pos - 5) throw new RpcError(13, "truncated gRPC-Web frame");
    const data = bytes.subarray(pos + 5, pos + 5 + length);
    pos += 5 + length;
    if (flags & 0x80) {
      trailers = parseTrailers(fromUtf8.decode(data));
    } else if (flags & 0x01) {
      throw new RpcError(13, "compressed gRPC-Web message (not asked for)");
    } else {
      messages.push(data);
    }
  }
  return { messages, trailers };
}

function parseTrailers(text) {
  const out = new Map();
  for (const line of text.split("\r\n")) {
    const colon = line.indexOf(":");
    if (colon <= 0) continue;
    out.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
  }
  return out;
}

function percentDecode(value) {
  try {
    return decodeURIComponent(value);
  } catch {
    return value;
  }
}

function base64Bytes(value) {
  const padded = value.replace(/-/g, "+").replace(/_/g, "/");
  const binary = atob(padded + "===".slice((padded.length + 3) % 4));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

// google.rpc.Status from grpc-status-details-bin: its message, ErrorInfo
// (reason, metadata) and BadRequest (field violations).
function richError(code, message, detailsBin) {
  if (!detailsBin) return new RpcError(code, message);
  try {
    const status = decode(RPC_STATUS, base64Bytes(detailsBin));
    const details = {};
    for (const any of status.details) {
      if (any.typeUrl.endsWith("/google.rpc.ErrorInfo")) {
        const info = decode(ERROR_INFO, any.value);
        details.reason = info.reason;
        details.metadata = info.metadata;
      } else if (any.typeUrl.endsWith("/google.rpc.BadRequest")) {
        details.violations = decode(BAD_REQUEST, any.value).fieldViolations;
      }
    }
    return new RpcError(code, status.message || message, details);
  } catch {
    return new RpcError(code, message);
  }
}

function statusOf(headers) {
  // headers: a Map (trailers frame) or fetch Headers
  const status = headers.get("grpc-status");
  if (status === null || status === undefined) return null;
  const code = Number.parseInt(status, 10);
  return richError(
    Number.isNaN(code) ? 2 : code,
    percentDecode(headers.get("grpc-message") || ""),
    headers.get("grpc-status-details-bin"),
  );
}

const HTTP_CODES = { 400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14 };

async function call(method, request) {
  const key = storedKey();
  if (!key) throw new RpcError(16, "Enter your reviewer key first.");
  const { request: requestSchema, response: responseSchema } = METHODS[method];
  let response;
  try {
    response = await fetch(SERVICE + method, {
      method: "POST",
      headers: {
        "content-type": "application/grpc-web+proto",
        accept: "application/grpc-web+proto",
        "x-grpc-web": "1",
        "grpc-timeout": DEADLINE,
        authorization: `Bearer ${key}`,
      },
      body: frame(encode(requestSchema, request)),
      cache: "no-store",
      credentials: "omit",
      redirect: "error",
      referrerPolicy: "no-referrer",
    });
  } catch (error) {
    throw new RpcError(14, `Envoy could not be reached (${error.message})`);
  }
  const headerStatus = statusOf(response.headers);
  if (!response.ok) {
    const code = HTTP_CODES[response.status] ?? 2;
    throw headerStatus && headerStatus.code !== 0
      ? headerStatus
      : new RpcError(code, `HTTP ${response.status} from ${method}`);
  }
  if (headerStatus && headerStatus.code !== 0) throw headerStatus; // trailers-only
  const length = Number(response.headers.get("content-length") || 0);
  if (length > MAX_RESPONSE_BYTES) throw new RpcError(8, "response too large");
  const body = new Uint8Array(await response.arrayBuffer());
  const { messages, trailers } = parseFrames(body);
  const trailerStatus = trailers ? statusOf(trailers) : headerStatus;
  if (!trailerStatus) throw new RpcError(13, `${method}: the answer had no gRPC status`);
  if (trailerStatus.code !== 0) throw trailerStatus;
  if (messages.length !== 1) throw new RpcError(13, `${method}: expected one message`);
  return decode(responseSchema, messages[0]);
}

// ---- the DOM (createElement and textContent only) ---------------------------

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (/html/i.test(name)) throw new TypeError(`no ${name}: text only`);
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name.startsWith("aria-") || name === "role" || name === "for") {
      node.setAttribute(name, value);
    } else node[name] = value; // textContent, value, type, disabled, ...
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

const $ = (id) => document.getElementById(id);

function timeText(ts) {
  if (!ts || (!ts.seconds && !ts.nanos)) return "";
  const date = new Date(ts.seconds * 1000 + Math.floor(ts.nanos / 1e6));
  return date.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function showError(error) {
  const box = $("error");
  box.replaceChildren();
  if (!error) {
    box.hidden = true;
    return;
  }
  const parts = [];
  if (error instanceof RpcError) {
    parts.push(h("strong", { textContent: error.codeName }));
    parts.push(`: ${error.message}`);
    if (error.reason) parts.push(h("span", { class: "reason", textContent: ` (${error.reason})` }));
    const list = error.violations.map((v) =>
      h("li", {}, h("code", { textContent: v.field }), ` ${v.description}`),
    );
    if (list.length) parts.push(h("ul", {}, list));
  } else {
    parts.push(String(error && error.message ? error.message : error));
  }
  box.append(...parts);
  box.hidden = false;
}

async function guarded(work) {
  showError(null);
  try {
    await work();
  } catch (error) {
    showError(error);
    if (!(error instanceof RpcError)) console.error(error);
  }
}

// ---- the reviewer key (sessionStorage only; never in the URL) ---------------

function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function showKeyState() {
  const has = storedKey() !== "";
  $("key-state").textContent = has ? "Key set for this tab." : "No key set.";
  $("forget-key").hidden = !has;
  $("queue").hidden = !has;
  if (!has) $("detail").hidden = true;
}

function useKey() {
  const input = $("key-input");
  const key = input.value.trim();
  input.value = "";
  if (!KEY_PATTERN.test(key)) {
    showError(new RpcError(3, "A key is 8 to 512 visible ASCII characters, without spaces."));
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  showKeyState();
  loadQueue(true);
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  current = null;
  $("queue-rows").replaceChildren();
  showKeyState();
}

// ---- the queue -------------------------------------------------------------

const queue = { tokens: [""], page: 0, next: "" };
let current = null; // the open item

function queueRequest() {
  const model = $("filter-model").value.trim();
  if (model && !MODEL_PATTERN.test(model)) {
    throw new RpcError(3, "A model name is lowercase letters, digits and '-' (2 to 63).");
  }
  return {
    state: Number($("filter-state").value),
    source: Number($("filter-source").value),
    model,
    pageSize: Number($("page-size").value),
    pageToken: queue.tokens[queue.page],
  };
}

function loadQueue(fromStart) {
  if (fromStart) {
    queue.tokens = [""];
    queue.page = 0;
  }
  return guarded(async () => {
    const response = await call("ListItems", queueRequest());
    queue.next = response.nextPageToken;
    renderQueue(response.items);
  });
}

function renderQueue(items) {
  const rows = items.map((item) =>
    h(
      "tr",
      { class: current && current.name === item.name ? "selected" : "" },
      h(
        "td",
        {},
        h("button", {
          type: "button",
          class: "link",
          textContent: item.name,
          dataset: { item: item.name },
          onclick: () => openItem(item.name),
        }),
      ),
      h("td", { textContent: SOURCES[item.source] || String(item.source) }),
      h("td", { textContent: item.modelVersion ? `${item.model}@${item.modelVersion}` : item.model }),
      h("td", {}, h("span", { class: `state s${item.state}`, textContent: STATES[item.state] || "?" })),
      h("td", { textContent: timeText(item.createTime) }),
    ),
  );
  $("queue-rows").replaceChildren(...rows);
  $("queue-empty").hidden = items.length !== 0;
  $("page-label").textContent = `Page ${queue.page + 1}`;
  $("prev-page").disabled = queue.page === 0;
  $("next-page").disabled = !queue.next;
}

// ---- one item, side by side ------------------------------------------------

function openItem(name) {
  if (!ITEM_NAME_PATTERN.test(name)) return;
  return guarded(async () => {
    const { item } = await call("GetItem", { name });
    renderItem(item);
  });
}

function panel(title, subtitle, text, id) {
  return h(
    "section",
    { class: "panel" },
    h("h3", {}, title, subtitle ? h("span", { class: "sub", textContent: ` ${subtitle}` }) : null),
    // textContent: the model's text stays text, whatever it contains
    h("pre", { id, textContent: text || "(empty)" }),
  );
}

function fact(label, value) {
  if (!value) return null;
  return [h("dt", { textContent: label }), h("dd", { textContent: value })];
}

function renderItem(item) {
  current = item;
  const decided = item.state === 3;
  $("detail").hidden = false;
  $("detail-name").textContent = item.name;
  $("detail-state").textContent = STATES[item.state] || "?";
  $("detail-state").className = `state s${item.state}`;
  $("detail-facts").replaceChildren(
    ...[
      fact("Source", `${SOURCES[item.source] || item.source} (${item.sourceId})`),
      fact("Request id", item.requestId),
      fact("Submitted by", item.submitterKeyId),
      fact("Queued", timeText(item.createTime)),
      item.state === 2 ? fact("Claimed by", item.claimHolder) : null,
      item.state === 2 ? fact("Claim ends", timeText(item.claimExpireTime)) : null,
      fact("Escalation reason", item.escalationReason),
      decided ? fact("Verdict", VERDICTS[item.verdict] || String(item.verdict)) : null,
      decided ? fact("Correct label", item.correctLabel) : null,
      decided ? fact("Note", item.note) : null,
      decided ? fact("Decided by", item.reviewerKeyId) : null,
      decided ? fact("Decided", timeText(item.decideTime)) : null,
    ]
      .filter(Boolean)
      .flat(),
  );
  const alternative = [item.alternativeModel, item.alternativeVersion].filter(Boolean).join("@");
  $("side-by-side").replaceChildren(
    panel("Inputs", "", item.inputs, "inputs"),
    panel("Primary output", [item.model, item.modelVersion].filter(Boolean).join("@"), item.primaryOutput, "primary-output"),
    panel(ALTERNATIVE_TITLE[item.source] || "Alternative output", alternative, item.alternativeOutput, "alternative-output"),
  );
  const context = Object.entries(item.context).sort(([a], [b]) => a.localeCompare(b));
  $("context-rows").replaceChildren(
    ...context.map(([k, v]) => h("tr", {}, h("th", { textContent: k }), h("td", {}, h("pre", { textContent: v })))),
  );
  $("context-empty").hidden = context.length !== 0;
  $("claim").disabled = decided;
  $("actions").hidden = decided;
  for (const row of document.querySelectorAll("#queue-rows tr")) {
    const button = row.querySelector("button");
    row.className = button && button.dataset.item === item.name ? "selected" : "";
  }
}

function act(method, request, after) {
  if (!current) return;
  return guarded(async () => {
    const { item } = await call(method, { name: current.name, ...request });
    renderItem(item);
    if (after) after();
    await loadQueueQuietly();
  });
}

async function loadQueueQuietly() {
  const response = await call("ListItems", queueRequest());
  queue.next = response.nextPageToken;
  renderQueue(response.items);
}

function submitVerdict() {
  const verdict = Number($("verdict").value);
  if (!verdict) {
    showError(new RpcError(3, "Choose a verdict."));
    return;
  }
  return act(
    "SubmitVerdict",
    { verdict, correctLabel: $("correct-label").value, note: $("note").value },
    () => {
      $("correct-label").value = "";
      $("note").value = "";
    },
  );
}

function escalate() {
  const reason = $("escalate-reason").value.trim();
  if (!reason) {
    showError(new RpcError(3, "Say why you escalate it."));
    return;
  }
  return act("EscalateItem", { reason }, () => {
    $("escalate-reason").value = "";
  });
}

// ---- start -----------------------------------------------------------------

function fillSelect(select, labels, skipZero) {
  select.replaceChildren(
    ...Object.entries(labels)
      .filter(([value]) => !(skipZero && value === "0"))
      .map(([value, label]) => h("option", { value, textContent: label })),
  );
}

function start() {
  fillSelect($("filter-state"), STATES);
  $("filter-state").value = "1"; // Open
  fillSelect($("filter-source"), SOURCES);
  $("verdict").replaceChildren(
    h("option", { value: "0", textContent: "Choose a verdict…" }),
    ...Object.entries(VERDICTS).map(([value, label]) => h("option", { value, textContent: label })),
  );
  $("use-key").addEventListener("click", useKey);
  $("key-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter") useKey();
  });
  $("forget-key").addEventListener("click", forgetKey);
  for (const id of ["filter-state", "filter-source", "page-size"]) {
    $(id).addEventListener("change", () => loadQueue(true));
  }
  $("filter-model").addEventListener("change", () => loadQueue(true));
  $("refresh").addEventListener("click", () => loadQueue(true));
  $("prev-page").addEventListener("click", () => {
    if (queue.page > 0) queue.page -= 1;
    loadQueue(false);
  });
  $("next-page").addEventListener("click", () => {
    if (!queue.next) return;
    queue.tokens[queue.page + 1] = queue.next;
    queue.page += 1;
    loadQueue(false);
  });
  $("claim").addEventListener("click", () => act("ClaimItem", {}));
  $("submit-verdict").addEventListener("click", submitVerdict);
  $("escalate").addEventListener("click", escalate);
  $("close-item").addEventListener("click", () => {
    current = null;
    $("detail").hidden = true;
  });
  showKeyState();
  if (storedKey()) loadQueue(true);
}

start();
