// Mosaic operator console. Plain browser JavaScript, no build step and nothing fetched from elsewhere.
// The API key is asked for once, kept in this tab's sessionStorage and sent as the X-API-Key header;
// every text that comes from the server is set with textContent, never parsed as HTML.
"use strict";

const KEY_STORAGE = "mosaic-api-key";
const STREAMS_EVERY_MS = 2000;
const TILE_FRAME_EVERY_MS = 5000;
const WATCHES_EVERY_MS = 10000;
const WATCH_RECONNECT_MS = 5000;
const MAX_WATCH_EVENTS = 50;
const UNIX_CLOCK_S = 1e9; // stream clocks past this are Unix time (pushed or live cameras)

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  streams: new Map(), // stream_id -> the latest JSON of the stream
  tiles: new Map(), // stream_id -> {root, img, lastFrameMs, keyframeId}
  watchAfter: 0,
  watching: false,
  timers: [],
};

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers);
  if (state.key) headers["X-API-Key"] = state.key;
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    const err = new ApiError(response.status, body);
    if (response.status === 401) askForKey(err.message);
    throw err;
  }
  return response;
}

const apiJson = async (path) => (await api(path)).json();

// Server-Sent Events read from a fetch body (EventSource cannot send the key as a header).
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

// -- times --------------------------------------------------------------------------------------------
function clockStart(streamId) {
  const stream = state.streams.get(streamId);
  const first = stream ? stream.first_timestamp_s : null;
  return first !== null && first > UNIX_CLOCK_S ? first : 0;
}

function formatTime(streamId, seconds) {
  const s = Math.max(0, seconds - clockStart(streamId));
  const minutes = Math.floor(s / 60);
  const rest = (s - minutes * 60).toFixed(1).padStart(4, "0");
  return `${minutes}:${rest}`;
}

function formatSpan(streamId, span) {
  const start = formatTime(streamId, span.start_s);
  const end = formatTime(streamId, span.end_s);
  return start === end ? start : `${start}-${end}`;
}

// -- key ----------------------------------------------------------------------------------------------
function askForKey(message) {
  state.timers.forEach(clearInterval);
  state.timers = [];
  $("console").hidden = true;
  $("key-form").hidden = false;
  $("key-error").textContent = state.key ? message : "";
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("key-input").value;
  sessionStorage.setItem(KEY_STORAGE, state.key);
  start();
});

// -- cameras ------------------------------------------------------------------------------------------
function tileFor(stream) {
  let tile = state.tiles.get(stream.stream_id);
  if (tile) return tile;
  const root = el("div", "camera");
  const frame = el("div", "no-frame", "no keyframe yet");
  const meta = el("div", "meta");
  root.append(frame, meta);
  tile = { root, frame, meta, lastFrameMs: 0, keyframeId: "" };
  state.tiles.set(stream.stream_id, tile);
  $("cameras").append(root);
  const option = el("option", "", stream.stream_id);
  option.value = stream.stream_id;
  $("ask-streams").append(option);
  return tile;
}

function renderTile(stream) {
  const tile = tileFor(stream);
  const name = el("div", "name", stream.stream_id);
  name.append(el("span", `state ${stream.state}`, stream.state));
  const stats = el(
    "div",
    "muted",
    `lag ${stream.lag_s.toFixed(1)} s · ${stream.frames_dropped} dropped · ` +
      `${stream.frames_ingested} frames · ${stream.num_clusters} clusters`,
  );
  tile.meta.replaceChildren(name, stats);
  if (stream.source_error) tile.meta.append(el("div", "error", stream.source_error));
  if (Date.now() - tile.lastFrameMs >= TILE_FRAME_EVERY_MS) {
    tile.lastFrameMs = Date.now();
    refreshTileFrame(stream.stream_id, tile).catch(() => {});
  }
}

async function refreshTileFrame(streamId, tile) {
  const body = await apiJson(`/api/keyframes?stream_id=${encodeURIComponent(streamId)}&latest=1`);
  const keyframe = body.keyframes[0];
  if (!keyframe || keyframe.id === tile.keyframeId) return;
  tile.keyframeId = keyframe.id;
  const img = el("img");
  img.src = `data:image/jpeg;base64,${keyframe.jpeg_base64}`;
  img.alt = `${streamId} at ${formatTime(streamId, keyframe.timestamp_s)}`;
  tile.frame.replaceWith(img);
  tile.frame = img;
}

async function refreshStreams() {
  const body = await apiJson("/api/streams");
  const seen = new Set();
  for (const stream of body.streams) {
    seen.add(stream.stream_id);
    state.streams.set(stream.stream_id, stream);
    renderTile(stream);
  }
  for (const [streamId, tile] of state.tiles) {
    if (seen.has(streamId)) continue;
    tile.root.remove();
    state.tiles.delete(streamId);
    state.streams.delete(streamId);
    const option = [...$("ask-streams").options].find((o) => o.value === streamId);
    if (option) option.remove();
  }
  $("status").textContent = `${body.streams.length} camera(s) · updated ${new Date().toLocaleTimeString()}`;
}

// -- questions ----------------------------------------------------------------------------------------
$("ask-form").addEventListener("submit", (event) => {
  event.preventDefault();
  ask($("ask-question").value, $("ask-streams").value).catch((err) => {
    $("timings").replaceChildren(el("span", "error", err.message));
  });
});

async function ask(question, streamId) {
  const answer = $("answer");
  answer.textContent = "";
  $("timings").textContent = "asking ...";
  $("evidence").replaceChildren();
  $("ask-button").disabled = true;
  try {
    const response = await api("/api/query", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ question, stream_ids: streamId ? [streamId] : [] }),
    });
    for await (const { event, data } of sseEvents(response)) {
      if (event === "token") answer.textContent += data.text;
      else if (event === "evidence") await renderEvidence(data.spans);
      else if (event === "timings") $("timings").textContent = timingsLine(data);
      else if (event === "error") throw new ApiError(data.status, data);
    }
  } finally {
    $("ask-button").disabled = false;
  }
}

function timingsLine(t) {
  return (
    `first token ${(t.time_to_first_token_s * 1000).toFixed(0)} ms · decode ${(t.decode_s * 1000).toFixed(0)} ms · ` +
    `${t.num_tokens} tokens · queue ${(t.queue_s * 1000).toFixed(1)} ms · ${t.bytes_fetched} bytes fetched`
  );
}

// One row per camera: a timeline of its history with the evidence spans on it, then their keyframes in time order.
async function renderEvidence(spans) {
  const byStream = new Map();
  for (const span of spans) {
    if (!byStream.has(span.stream_id)) byStream.set(span.stream_id, []);
    byStream.get(span.stream_id).push(span);
  }
  const rows = [];
  for (const [streamId, streamSpans] of byStream) {
    streamSpans.sort((a, b) => a.start_s - b.start_s);
    rows.push(evidenceRow(streamId, streamSpans));
  }
  $("evidence").replaceChildren(...(await Promise.all(rows)));
}

async function evidenceRow(streamId, spans) {
  const row = el("div", "evidence-row");
  row.append(el("div", "name", streamId), timeline(streamId, spans));
  const strip = el("div", "strip");
  row.append(strip);
  const ids = spans.flatMap((s) => s.keyframe_ids).slice(0, 64);
  let keyframes = [];
  if (ids.length) {
    const query = ids.map((id) => `&id=${encodeURIComponent(id)}`).join("");
    try {
      keyframes = (await apiJson(`/api/keyframes?stream_id=${encodeURIComponent(streamId)}${query}`)).keyframes;
    } catch (err) {
      strip.append(el("span", "error", `keyframes: ${err.message}`));
    }
  }
  const rankOf = new Map(spans.map((s) => [s.cluster_id, s.rank]));
  keyframes.sort((a, b) => a.timestamp_s - b.timestamp_s);
  for (const keyframe of keyframes) {
    const figure = el("figure");
    const img = el("img", "thumb");
    img.src = `data:image/jpeg;base64,${keyframe.jpeg_base64}`;
    img.alt = `${streamId} at ${formatTime(streamId, keyframe.timestamp_s)}`;
    const rank = rankOf.get(keyframe.cluster_id);
    figure.append(img, el("figcaption", "", `#${rank} · ${formatTime(streamId, keyframe.timestamp_s)}`));
    strip.append(figure);
  }
  if (!keyframes.length && !ids.length) strip.append(el("span", "muted", "no keyframes for these spans"));
  return row;
}

function timeline(streamId, spans) {
  const stream = state.streams.get(streamId);
  let start = Math.min(...spans.map((s) => s.start_s));
  let end = Math.max(...spans.map((s) => s.end_s));
  if (stream && stream.first_timestamp_s !== null) start = Math.min(start, stream.first_timestamp_s);
  if (stream && stream.last_timestamp_s !== null) end = Math.max(end, stream.last_timestamp_s);
  const width = Math.max(end - start, 1e-6);
  const bar = el("div", "timeline");
  bar.title = `${formatTime(streamId, start)} - ${formatTime(streamId, end)}`;
  for (const span of spans) {
    const block = el("div", "span");
    block.style.left = `${(100 * (span.start_s - start)) / width}%`;
    block.style.width = `${(100 * (span.end_s - span.start_s)) / width}%`;
    block.title = `#${span.rank} ${formatSpan(streamId, span)}`;
    bar.append(block);
  }
  const row = el("div");
  const labels = spans.map((s) => `#${s.rank} ${formatSpan(streamId, s)}`);
  row.append(bar, el("div", "muted", labels.join(" · ")));
  return row;
}

// -- watch events -------------------------------------------------------------------------------------
async function refreshWatches() {
  const body = await apiJson("/api/watches");
  $("watch-section").hidden = body.watches.length === 0;
  if (body.watches.length && !state.watching) followWatchEvents();
}

async function followWatchEvents() {
  state.watching = true;
  try {
    const response = await api(`/api/watch-events?after_event_id=${state.watchAfter}`);
    for await (const { event, data } of sseEvents(response)) {
      if (event === "error") throw new ApiError(data.status, data);
      state.watchAfter = data.event_id;
      showWatchEvent(data);
    }
  } catch (err) {
    $("status").textContent = `watch events: ${err.message}`;
  } finally {
    setTimeout(() => (state.watching = false), WATCH_RECONNECT_MS); // the next refreshWatches reconnects
  }
}

function showWatchEvent(e) {
  const item = el("li");
  const text = el("div");
  const when = new Date(e.fired_unix_s * 1000).toLocaleTimeString();
  text.append(
    el("div", "name", `${when} · ${e.stream_id} ${formatTime(e.stream_id, e.start_s)} · ${e.watch_id}`),
    el("div", "", e.question),
    el("div", e.answer_error ? "error" : "", e.answer || e.answer_error),
  );
  item.append(text);
  const list = $("watch-events");
  list.prepend(item);
  while (list.children.length > MAX_WATCH_EVENTS) list.lastChild.remove();
  showClusterFrame(item, e).catch(() => {});
}

// The middle keyframe of the cluster that fired, before the event's text.
async function showClusterFrame(item, e) {
  const query = `stream_id=${encodeURIComponent(e.stream_id)}&cluster_id=${encodeURIComponent(e.cluster_id)}`;
  const keyframes = (await apiJson(`/api/keyframes?${query}`)).keyframes;
  if (!keyframes.length) return;
  const keyframe = keyframes[Math.floor(keyframes.length / 2)];
  const img = el("img", "thumb");
  img.src = `data:image/jpeg;base64,${keyframe.jpeg_base64}`;
  img.alt = `${e.stream_id} at ${formatTime(e.stream_id, keyframe.timestamp_s)}`;
  item.prepend(img);
}

// -- start --------------------------------------------------------------------------------------------
function every(ms, task) {
  const run = () => task().catch((err) => ($("status").textContent = err.message));
  state.timers.push(setInterval(run, ms));
}

async function start() {
  try {
    await refreshStreams();
  } catch (err) {
    if (err.status !== 401) $("status").textContent = err.message;
    if (err.status === 401) return;
  }
  $("key-form").hidden = true;
  $("console").hidden = false;
  every(STREAMS_EVERY_MS, refreshStreams);
  every(WATCHES_EVERY_MS, refreshWatches);
  refreshWatches().catch(() => {});
}

start();
