// The WebSocket side of protocol v1 (docs/protocol.md): connects to the server the page came
// from, reconnects with backoff, parses binary audio frames.

import { HEADER_BYTES } from "./decoders.js";

// ws(s)://host/v1/tts for a page at http(s)://host/..., passing on ?token= if the page has one.
export function websocketUrl(location) {
  const url = new URL("/v1/tts", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.hash = "";
  const token = new URLSearchParams(location.search).get("token");
  url.search = token ? `?${new URLSearchParams({ token })}` : "";
  return url.href;
}

// Events go to the handlers given:
//   onState(state, detail)  state: "connecting" | "open" | "closed"
//   onMessage(message)      every JSON message, `hello` included
//   onAudio(frame)          {stream, segment, seq, buffer, offset}: the payload is
//                           buffer[offset:]
export class Connection {
  constructor(url, { onState, onMessage, onAudio }) {
    this.url = url;
    this.onState = onState;
    this.onMessage = onMessage;
    this.onAudio = onAudio;
    this.ws = null;
    this.hello = null;
    this.retries = 0;
    this.timer = null;
    this.closing = false;
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN && this.hello !== null;
  }

  connect() {
    clearTimeout(this.timer);
    this.hello = null;
    this.onState("connecting", this.url.replace(/([?&]token=)[^&]*/, "$1…"));
    const ws = new WebSocket(this.url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onmessage = (event) => {
      if (typeof event.data === "string") {
        let message;
        try {
          message = JSON.parse(event.data);
        } catch {
          return;
        }
        if (message.type === "hello") {
          this.hello = message;
          this.retries = 0;
          this.onState("open", message);
        }
        this.onMessage(message);
      } else {
        const view = new DataView(event.data);
        if (view.byteLength < HEADER_BYTES) return;
        this.onAudio({
          stream: view.getUint32(0, true),
          segment: view.getUint32(4, true),
          seq: view.getUint32(8, true),
          buffer: event.data,
          offset: HEADER_BYTES,
        });
      }
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.hello = null;
      if (this.closing) {
        this.onState("closed", { code: event.code, reason: event.reason, retryInMs: null });
        return;
      }
      // 1008 (policy: e.g. a wrong token) will not get better by retrying quickly
      const base = event.code === 1008 ? 10_000 : 500;
      const delay = Math.min(base * 2 ** this.retries, 15_000);
      this.retries += 1;
      this.onState("closed", { code: event.code, reason: event.reason, retryInMs: delay });
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }

  send(message) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  close() {
    this.closing = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, "bye");
  }
}
