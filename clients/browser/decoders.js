// Payload decoders: PCM straight to Float32, Opus through WebCodecs' AudioDecoder.

export const HEADER_BYTES = 12; // uint32 stream, uint32 segment, uint32 sequence (little-endian)

// Samples of a PCM payload, `format` "pcm_s16le" or "pcm_f32le", starting at `offset` of `buffer`.
export function pcmToFloat32(buffer, offset, format) {
  const view = new DataView(buffer, offset);
  if (format === "pcm_s16le") {
    const out = new Float32Array(view.byteLength >> 1);
    for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
    return out;
  }
  if (format === "pcm_f32le") {
    const out = new Float32Array(view.byteLength >> 2);
    for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(4 * i, true);
    return out;
  }
  throw new Error(`not a PCM format: ${format}`);
}

// {supported, reason}: whether this browser can decode mono Opus at `sampleRate`.
export async function opusSupport(sampleRate) {
  if (typeof AudioDecoder !== "function" || typeof EncodedAudioChunk !== "function") {
    return {
      supported: false,
      reason: globalThis.isSecureContext
        ? "this browser has no WebCodecs AudioDecoder"
        : "WebCodecs needs a secure context (https, or http on localhost)",
    };
  }
  try {
    const result = await AudioDecoder.isConfigSupported({
      codec: "opus",
      sampleRate,
      numberOfChannels: 1,
    });
    const supported = Boolean(result.supported);
    return { supported, reason: supported ? "" : "not supported" };
  } catch (err) {
    return { supported: false, reason: String(err) };
  }
}

// First channel of an AudioData as Float32, whatever its sample format.
function audioDataToFloat32(data) {
  const n = data.numberOfFrames;
  const out = new Float32Array(n);
  try {
    data.copyTo(out, { planeIndex: 0, format: "f32-planar" });
    return out;
  } catch {
    // older implementations copy only in the data's own format
  }
  const format = data.format;
  const channels = format.endsWith("-planar") ? 1 : data.numberOfChannels;
  const raw = new ArrayBuffer(data.allocationSize({ planeIndex: 0 }));
  data.copyTo(raw, { planeIndex: 0 });
  const base = format.replace("-planar", "");
  const src =
    base === "f32"
      ? new Float32Array(raw)
      : base === "s16"
        ? new Int16Array(raw)
        : base === "s32"
          ? new Int32Array(raw)
          : new Uint8Array(raw);
  const scale = base === "s16" ? 1 / 32768 : base === "s32" ? 1 / 2147483648 : 1;
  for (let i = 0; i < n; i++) {
    const v = src[i * channels];
    out[i] = base === "u8" ? (v - 128) / 128 : v * scale;
  }
  return out;
}

// Decodes one stream's Opus packets (one 20 ms frame each) in order. `onSamples(samples, rate,
// segment)` gets each decoded frame, tagged with the segment its packet came in.
export class OpusStreamDecoder {
  constructor(sampleRate, onSamples, onError) {
    this.onSamples = onSamples;
    this.segments = new Map(); // chunk timestamp (µs) -> segment index
    this.timestamp = 0;
    this.lastSegment = 0;
    this.decoder = new AudioDecoder({
      output: (data) => this._output(data),
      error: (err) => onError(err),
    });
    this.decoder.configure({ codec: "opus", sampleRate, numberOfChannels: 1 });
  }

  decode(packet, segment) {
    if (this.decoder.state !== "configured") return;
    const timestamp = this.timestamp;
    this.timestamp += 20_000;
    this.segments.set(timestamp, segment);
    this.lastSegment = segment;
    const chunk = new EncodedAudioChunk({ type: "key", timestamp, duration: 20_000, data: packet });
    this.decoder.decode(chunk);
  }

  // Resolves once every packet given so far has been output; false if the decoder was closed.
  async flush() {
    if (this.decoder.state !== "configured") return false;
    try {
      await this.decoder.flush();
      return true;
    } catch {
      return false; // closed or reset meanwhile
    }
  }

  close() {
    this.segments.clear();
    if (this.decoder.state !== "closed") this.decoder.close();
  }

  _output(data) {
    let segment = this.segments.get(data.timestamp);
    if (segment === undefined) segment = this.lastSegment;
    this.segments.delete(data.timestamp);
    const rate = data.sampleRate;
    let samples;
    try {
      samples = audioDataToFloat32(data);
    } finally {
      data.close();
    }
    this.onSamples(samples, rate, segment);
  }
}
