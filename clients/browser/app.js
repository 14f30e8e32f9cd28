// The page: text in, audio out, as it arrives. See clients/browser/README.md.

import { Connection, websocketUrl } from "./connection.js";
import { OpusStreamDecoder, opusSupport, pcmToFloat32 } from "./decoders.js";
import { Player } from "./player.js";

const WORD_DELAY_MS = 60; // "stream as words": one piece every this often
const FORMATS = ["opus", "pcm_s16le", "pcm_f32le"];
const FORMAT_LABELS = { opus: "Opus", pcm_s16le: "PCM 16-bit", pcm_f32le: "PCM float" };

const $ = (id) => document.getElementById(id);
const ui = {
  connection: $("connection"),
  form: $("speak-form"),
  text: $("text"),
  voice: $("voice"),
  format: $("format"),
  words: $("stream-words"),
  early: $("early-audio"),
  speak: $("speak"),
  stop: $("stop"),
  transcript: $("transcript"),
  scope: $("scope"),
  level: $("level"),
  state: $("state"),
  ttfa: $("ttfa"),
  firstSound: $("first-sound"),
  buffered: $("buffered"),
  underruns: $("underruns"),
  decoder: $("decoder"),
  announce: $("announce"),
  message: $("message"),
};
const params = new URLSearchParams(location.search);

// A hook for tests (no audio hardware needed to read it); also handy in the console.
const seTest = {
  connection: "connecting",
  state: "idle",
  runs: 0,
  player: null, // "worklet" | "script"
  opusSupported: null,
  opusReason: "",
  format: null,
  codec: null, // "webcodecs-opus" | "pcm"
  sampleRate: null,
  outputRate: null,
  streamId: null,
  stream: null,
  ttfaMs: null, // first speak sent -> first audio frame received
  firstSoundMs: null, // first speak sent -> the worklet starts playing
  serverTtfaMs: null,
  serverAudioMs: null, // from `done`
  decodedRate: null, // the rate the decoder put out (WebCodecs' Opus: 48000)
  segments: {}, // index -> text, from the `segment` messages
  decodedFrames: {}, // index -> frames (Opus packets decoded, or PCM frames)
  decodedSamples: {}, // index -> samples
  scheduledSegments: [], // segment indexes in the order their audio was handed to the player
  scheduledSamples: 0,
  playedSegments: [], // in the order the player started each
  playingSegment: null,
  maxAbs: 0, // largest |sample| handed to the player
  underruns: 0,
  bufferedMs: 0,
  playing: false,
  level: 0,
  peakLevel: 0,
  flushed: 0,
  sent: [], // types of the messages sent for the stream
  received: [], // types of the messages received for the stream
  terminal: null, // "done" | "cancelled" | "error"
  cancelled: false,
  framesAfterStop: 0,
  silentAfterStopMs: null, // Stop pressed -> the player's first all-silent report
  errors: [],
};
window.seTest = seTest;

let connection = null;
let player = null;
let playerPromise = null;
let opus = { supported: false, reason: "not checked yet" };
let current = null; // the stream being spoken, see speak()
let nextId = 1;

// -- connection -------------------------------------------------------------------------------

function setConnection(state, detail) {
  seTest.connection = state;
  ui.connection.dataset.state = state;
  if (state === "connecting") {
    ui.connection.textContent = "Connecting…";
  } else if (state === "open") {
    ui.connection.textContent = `Connected · ${detail.model}`;
    fillChoices(detail);
  } else {
    const retry = detail.retryInMs;
    ui.connection.textContent =
      retry == null ? "Disconnected" : `Disconnected · retrying in ${Math.ceil(retry / 1000)} s`;
    if (current && !current.terminal) finish("error", "the connection was lost");
  }
  updateButtons();
}

function fillChoices(hello) {
  const keepVoice = ui.voice.value;
  ui.voice.replaceChildren(new Option("Default (no preset)", ""));
  const groups = new Map();
  for (const name of hello.voices || []) {
    const m = /^v2\/([a-z]+)_speaker_/.exec(name);
    const lang = m ? m[1] : "other";
    if (!groups.has(lang)) groups.set(lang, []);
    groups.get(lang).push(name);
  }
  for (const [lang, names] of groups) {
    const group = document.createElement("optgroup");
    group.label = lang === "other" ? "Other" : lang.toUpperCase();
    for (const name of names) group.append(new Option(name.replace(/^v2\//, ""), name));
    ui.voice.append(group);
  }
  if ([...ui.voice.options].some((o) => o.value === keepVoice)) ui.voice.value = keepVoice;

  const keepFormat = ui.format.value || params.get("format") || "";
  ui.format.replaceChildren();
  for (const format of FORMATS) {
    if (!(hello.formats || []).includes(format)) continue;
    const option = new Option(FORMAT_LABELS[format], format);
    if (format === "opus" && !opus.supported) {
      option.disabled = true;
      option.textContent += " (not in this browser)";
    }
    ui.format.append(option);
  }
  const usable = [...ui.format.options].filter((o) => !o.disabled).map((o) => o.value);
  ui.format.value = usable.includes(keepFormat) ? keepFormat : usable[0] || "";
  const max = hello.limits && hello.limits.max_text_chars;
  if (max) ui.text.maxLength = max;
}

function onMessage(message) {
  if (message.type === "hello") return;
  if (message.type === "error" && message.id === null) {
    showMessage(`Server: ${message.message}`);
    seTest.errors.push(message.code);
    return;
  }
  if (!current || message.id !== current.id) return;
  seTest.received.push(message.type);
  switch (message.type) {
    case "started":
      current.number = message.stream;
      current.format = message.format;
      current.rate = message.sample_rate;
      seTest.stream = message.stream;
      seTest.format = message.format;
      seTest.sampleRate = message.sample_rate;
      if (message.format === "opus") {
        const stream = current;
        current.decoder = new OpusStreamDecoder(
          message.sample_rate,
          (samples, rate, segment) => schedule(stream, samples, rate, segment),
          (err) => {
            seTest.errors.push(`decoder: ${err}`);
            showMessage(`Opus decoder: ${err.message || err}`);
          },
        );
        seTest.codec = "webcodecs-opus";
      } else {
        seTest.codec = "pcm";
      }
      ui.decoder.textContent = [
        FORMAT_LABELS[message.format],
        `${message.sample_rate} Hz`,
        ...(message.format === "opus" ? ["WebCodecs"] : []),
      ].join(" · ") + ` → ${player.kind === "worklet" ? "AudioWorklet" : "ScriptProcessor"}` +
        ` @ ${player.sampleRate} Hz`;
      break;
    case "segment":
      addSegment(message.index, message.text);
      break;
    case "segment_end": {
      const span = segmentSpan(message.index);
      if (span) span.dataset.audioMs = message.audio_ms;
      break;
    }
    case "done":
      seTest.serverTtfaMs = message.ttfa_ms;
      seTest.serverAudioMs = message.audio_ms;
      finish("done");
      break;
    case "cancelled":
      finish("cancelled");
      break;
    case "error":
      finish("error", `${message.code}: ${message.message}`);
      break;
  }
}

function onAudio(frame) {
  if (!current || frame.stream !== current.number) return;
  if (current.stopped) {
    seTest.framesAfterStop += 1; // none should come after `cancelled`; some may cross the cancel
    return;
  }
  if (current.firstAudioAt === null) {
    current.firstAudioAt = performance.now();
    seTest.ttfaMs = Math.round(current.firstAudioAt - current.t0);
    ui.ttfa.textContent = `${seTest.ttfaMs} ms`;
  }
  if (current.decoder) {
    current.decoder.decode(new Uint8Array(frame.buffer, frame.offset), frame.segment);
  } else {
    const samples = pcmToFloat32(frame.buffer, frame.offset, current.format);
    schedule(current, samples, current.rate, frame.segment);
  }
}

// Hand decoded samples of `stream` (the `current` object they belong to) to the player.
function schedule(stream, samples, rate, segment) {
  if (!stream || stream !== current || stream.stopped || !samples.length) return;
  seTest.decodedRate = rate;
  seTest.decodedFrames[segment] = (seTest.decodedFrames[segment] || 0) + 1;
  seTest.decodedSamples[segment] = (seTest.decodedSamples[segment] || 0) + samples.length;
  const order = seTest.scheduledSegments;
  if (order[order.length - 1] !== segment) order.push(segment);
  let peak = seTest.maxAbs;
  for (let i = 0; i < samples.length; i++) {
    const a = Math.abs(samples[i]);
    if (a > peak) peak = a;
  }
  seTest.maxAbs = peak;
  seTest.scheduledSamples += samples.length;
  player.push(samples, rate, stream.number, segment);
}

// -- the player's reports ---------------------------------------------------------------------

function onPlayerEvent(event) {
  const mine = current && event.stream === current.number && !current.stopped;
  switch (event.type) {
    case "start":
    case "segment":
      if (!mine) break;
      if (event.type === "start" && seTest.firstSoundMs === null) {
        seTest.firstSoundMs = Math.round(performance.now() - current.t0);
        ui.firstSound.textContent = `${seTest.firstSoundMs} ms`;
      }
      seTest.playingSegment = event.segment;
      seTest.playedSegments.push(event.segment);
      highlight(event.segment);
      break;
    case "underrun":
      if (!mine) break;
      seTest.underruns += 1;
      ui.underruns.textContent = String(seTest.underruns);
      break;
    case "drained":
      if (!mine) break;
      highlight(null, { allPlayed: true });
      seTest.playingSegment = null;
      if (current.terminal === "done") setState("done", "Finished speaking.");
      else if (current.terminal === "error") setState("error");
      break;
    case "flushed":
      seTest.flushed += 1;
      if (current && current.stopped && current.flushedAt === null) {
        current.flushedAt = performance.now();
      }
      break;
    case "status":
      if (current && current.flushedAt !== null && seTest.silentAfterStopMs === null &&
          event.peak === 0) {
        seTest.silentAfterStopMs = Math.round(performance.now() - current.stoppedAt);
      }
      seTest.level = event.peak;
      seTest.peakLevel = Math.max(seTest.peakLevel, event.peak);
      seTest.bufferedMs = event.bufferedMs;
      seTest.playing = event.playing;
      levelHistory.push(event.peak);
      if (levelHistory.length > LEVEL_HISTORY) levelHistory.shift();
      ui.level.value = Math.min(1, event.rms * 3);
      ui.buffered.textContent = event.playing || event.bufferedMs > 0
        ? `${Math.round(event.bufferedMs)} ms${event.playing ? "" : " (buffering)"}`
        : "–";
      break;
  }
}

// -- speaking ---------------------------------------------------------------------------------

async function ensurePlayer(sampleRate) {
  if (!playerPromise) {
    playerPromise = Player.create(sampleRate, onPlayerEvent, {
      forceScript: params.get("player") === "script",
    });
  }
  player = await playerPromise;
  seTest.player = player.kind;
  seTest.outputRate = player.sampleRate;
  await player.resume();
  return player;
}

function chooseRate(format) {
  const hello = connection.hello;
  const allowed = (hello.sample_rates && hello.sample_rates[format]) || [];
  if (allowed.includes(hello.sample_rate)) return hello.sample_rate;
  return allowed.length ? Math.max(...allowed.filter((r) => r <= 48_000)) : null;
}

async function speak() {
  const text = ui.text.value;
  if (!text.trim() || !connection.isOpen || (current && !current.settled)) return;
  const format = ui.format.value;
  const rate = chooseRate(format);
  const voice = ui.voice.value || null;
  // Created on the first click (browsers start audio only after a gesture); ask for the
  // stream's rate so that nothing needs resampling.
  try {
    await ensurePlayer(rate);
  } catch (err) {
    showMessage(`Audio output failed: ${err.message || err}`);
    return;
  }
  if (current && !current.settled) return;
  player.flush(); // anything left of a stream that was stopped
  resetForStream();
  current = {
    id: `b${nextId++}`,
    number: null,
    format,
    rate,
    decoder: null,
    t0: performance.now(),
    firstAudioAt: null,
    terminal: null,
    stopped: false,
    stoppedAt: null,
    flushedAt: null,
    settled: false,
    timer: null,
  };
  seTest.streamId = current.id;
  seTest.runs += 1;
  const opening = { type: "speak", id: current.id, voice, format, sample_rate: rate };
  if (ui.early.checked) opening.early_audio = true;
  if (ui.words.checked) {
    const pieces = text.match(/\s*\S+\s*/g) || [text];
    sendPiece(current, opening, pieces, 0);
  } else {
    send({ ...opening, text, final: true });
  }
  setState("speaking", "Speaking.");
}

function sendPiece(stream, opening, pieces, i) {
  if (stream !== current || stream.stopped || stream.terminal) return;
  const last = i === pieces.length - 1;
  const message = i === 0 ? { ...opening } : { type: "speak", id: stream.id };
  message.text = pieces[i];
  message.final = last;
  if (!send(message)) return;
  if (!last) {
    stream.timer = setTimeout(() => sendPiece(stream, opening, pieces, i + 1), WORD_DELAY_MS);
  }
}

function send(message) {
  const ok = connection.send(message);
  if (ok) seTest.sent.push(message.type);
  return ok;
}

function stop() {
  if (!current || current.stopped) return;
  const stream = current;
  stream.stopped = true;
  stream.stoppedAt = performance.now();
  clearTimeout(stream.timer);
  if (player) player.flush(); // silence now; the server's `cancelled` follows
  if (stream.decoder) stream.decoder.close();
  highlight(null);
  if (!stream.terminal) {
    send({ type: "cancel", id: stream.id });
    setState("cancelling", "Stopping.");
  } else {
    stream.settled = true;
    setState("stopped", "Stopped.");
  }
}

// The server ended the stream: `how` is "done", "cancelled" or "error".
async function finish(how, detail) {
  const stream = current;
  if (!stream || stream.terminal) return;
  stream.terminal = how;
  seTest.terminal = how;
  clearTimeout(stream.timer);
  if (how === "cancelled") {
    seTest.cancelled = true;
    if (player) player.flush();
    if (stream.decoder) stream.decoder.close();
    stream.settled = true;
    setState("cancelled", "Stopped.");
    return;
  }
  if (how === "error") {
    seTest.errors.push(detail);
    showMessage(`Error: ${detail}`);
  }
  stream.settled = true;
  if (stream.stopped) {
    setState("stopped", "Stopped.");
    return;
  }
  // play out what is still queued; the player reports "drained" at its end
  if (stream.decoder) {
    await stream.decoder.flush();
    stream.decoder.close();
  }
  if (stream !== current || stream.stopped) return;
  if (player && stream.number !== null) player.end(stream.number);
  setState(how === "done" ? "finishing" : "error");
}

function resetForStream() {
  Object.assign(seTest, {
    state: "idle",
    format: null,
    codec: null,
    sampleRate: null,
    streamId: null,
    stream: null,
    ttfaMs: null,
    firstSoundMs: null,
    serverTtfaMs: null,
    serverAudioMs: null,
    decodedRate: null,
    segments: {},
    decodedFrames: {},
    decodedSamples: {},
    scheduledSegments: [],
    scheduledSamples: 0,
    playedSegments: [],
    playingSegment: null,
    maxAbs: 0,
    underruns: 0,
    peakLevel: 0,
    sent: [],
    received: [],
    terminal: null,
    cancelled: false,
    framesAfterStop: 0,
    silentAfterStopMs: null,
    errors: [],
  });
  ui.transcript.replaceChildren();
  ui.ttfa.textContent = "–";
  ui.firstSound.textContent = "–";
  ui.underruns.textContent = "0";
  ui.message.textContent = "";
}

// -- the page ---------------------------------------------------------------------------------

const STATE_LABELS = {
  idle: "Idle",
  speaking: "Speaking",
  finishing: "Playing the rest",
  done: "Done",
  cancelling: "Stopping…",
  cancelled: "Cancelled",
  stopped: "Stopped",
  error: "Error",
};

function setState(state, announcement) {
  seTest.state = state;
  ui.state.textContent = STATE_LABELS[state] || state;
  ui.state.dataset.state = state;
  if (announcement) ui.announce.textContent = announcement;
  updateButtons();
}

function updateButtons() {
  const busy = Boolean(current && !current.settled);
  const open = Boolean(connection && connection.isOpen);
  ui.speak.disabled = busy || !open;
  const ended = ["done", "cancelled", "stopped", "error"].includes(seTest.state);
  ui.stop.disabled = !current || current.stopped || ended;
}

function showMessage(text) {
  ui.message.textContent = text;
}

function addSegment(index, text) {
  seTest.segments[index] = text;
  const span = document.createElement("span");
  span.className = "segment";
  span.dataset.index = String(index);
  span.textContent = text;
  if (ui.transcript.childNodes.length) ui.transcript.append(" ");
  ui.transcript.append(span);
}

function segmentSpan(index) {
  return ui.transcript.querySelector(`.segment[data-index="${index}"]`);
}

// Mark segment `index` as playing (null: none), those before it as played; `allPlayed` marks
// every segment played (the stream has been heard to its end).
function highlight(index, { allPlayed = false } = {}) {
  for (const span of ui.transcript.querySelectorAll(".segment")) {
    const i = Number(span.dataset.index);
    const playing = i === index;
    span.classList.toggle("playing", playing);
    if (index !== null) span.classList.toggle("played", i < index);
    else if (allPlayed) span.classList.add("played");
    if (playing) span.setAttribute("aria-current", "true");
    else span.removeAttribute("aria-current");
  }
}

// level history, drawn as a mirrored envelope
const LEVEL_HISTORY = 150;
const levelHistory = [];
function drawScope() {
  const canvas = ui.scope;
  const ratio = window.devicePixelRatio || 1;
  const width = Math.round(canvas.clientWidth * ratio);
  const height = Math.round(canvas.clientHeight * ratio);
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  const style = getComputedStyle(canvas);
  ctx.fillStyle = style.color;
  const bar = width / LEVEL_HISTORY;
  const offset = LEVEL_HISTORY - levelHistory.length;
  for (let i = 0; i < levelHistory.length; i++) {
    const h = Math.max(1, Math.min(1, levelHistory[i]) * (height - 2));
    ctx.fillRect((offset + i) * bar, (height - h) / 2, Math.max(1, bar - ratio), h);
  }
  requestAnimationFrame(drawScope);
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  speak();
});
ui.stop.addEventListener("click", stop);
ui.text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && !ui.stop.disabled) {
    event.preventDefault();
    stop();
  }
});

async function main() {
  opus = await opusSupport(24_000);
  seTest.opusSupported = opus.supported;
  seTest.opusReason = opus.reason;
  connection = new Connection(websocketUrl(location), {
    onState: setConnection,
    onMessage,
    onAudio,
  });
  connection.connect();
  setState("idle");
  requestAnimationFrame(drawScope);
}

main();
