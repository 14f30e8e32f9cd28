// A jitter buffer for streamed mono audio, shared by the AudioWorklet processor
// (player-worklet.js) and the ScriptProcessor fallback (player.js).
//
// Chunks of Float32 samples are queued with the stream and segment they belong to. `render`
// fills one output block: it waits until a little audio is buffered ("prebuffer") before it
// starts, then plays the chunks back to back with no gap between them, converting each chunk's
// sample rate to the output rate by linear interpolation (a no-op copy when the rates match).
// When the queue runs dry before the stream's end marker, that is an underrun: the block is
// padded with silence, the count goes up, and playback waits for the prebuffer again (a little
// longer each time). `flush` drops everything at once, after a fade of a few milliseconds so
// that stopping does not click.

const FADE_FRAMES = 96;

export class JitterBuffer {
  constructor(outputRate, options = {}) {
    const { prebufferMs = 200, prebufferStepMs = 100, maxPrebufferMs = 1000 } = options;
    this.outputRate = outputRate;
    this.prebufferFrames = Math.round((prebufferMs * outputRate) / 1000);
    this.initialPrebufferFrames = this.prebufferFrames;
    this.stepFrames = Math.round((prebufferStepMs * outputRate) / 1000);
    this.maxPrebufferFrames = Math.round((maxPrebufferMs * outputRate) / 1000);
    this.queue = []; // {data, rate, stream, segment} or {end: true, stream}
    this.pos = 0; // fractional read position in queue[0].data
    this.bufferedFrames = 0; // output frames still queued (approximate when resampling)
    this.playing = false;
    this.hasEnd = 0; // end markers in the queue
    this.underruns = 0;
    this.playedFrames = 0; // frames of real audio rendered, over all streams
    this.stream = null; // what is playing now
    this.segment = null;
    this.fade = null; // Float32Array tail to render after a flush
  }

  push(data, rate, stream, segment) {
    if (!data.length) return;
    this.queue.push({ data, rate, stream, segment });
    this.bufferedFrames += (data.length * this.outputRate) / rate;
  }

  // No more chunks will follow for `stream`: play out what is queued, with no underrun.
  end(stream) {
    this.queue.push({ end: true, stream });
    this.hasEnd += 1;
  }

  // Drop everything queued. The next block starts with a short fade-out of what was playing,
  // then silence.
  flush() {
    if (this.playing && this.queue.length) {
      const tail = new Float32Array(FADE_FRAMES);
      this._read(tail, 0, tail.length, []);
      for (let i = 0; i < tail.length; i++) tail[i] *= 1 - i / tail.length;
      this.fade = tail;
    }
    this.queue = [];
    this.pos = 0;
    this.bufferedFrames = 0;
    this.hasEnd = 0;
    this.playing = false;
    this.stream = null;
    this.segment = null;
    this.prebufferFrames = this.initialPrebufferFrames;
  }

  // Fill `out` (a Float32Array). Returns the events of this block: {type: "start" | "segment" |
  // "underrun" | "drained", stream, segment}.
  render(out) {
    const events = [];
    let i = 0;
    if (this.fade) {
      const n = Math.min(this.fade.length, out.length);
      out.set(this.fade.subarray(0, n));
      this.fade = this.fade.length > n ? this.fade.subarray(n) : null;
      i = n;
    }
    if (!this.playing && this.queue.length) {
      if (this.hasEnd > 0 || this.bufferedFrames >= this.prebufferFrames) {
        this.playing = true;
      }
    }
    if (this.playing) {
      i = this._read(out, i, out.length, events);
      if (i < out.length && this.playing) {
        // ran dry with the stream still open
        this.playing = false;
        this.underruns += 1;
        this.prebufferFrames = Math.min(
          this.prebufferFrames + this.stepFrames,
          this.maxPrebufferFrames,
        );
        events.push({ type: "underrun", stream: this.stream, segment: this.segment });
      }
    }
    out.fill(0, i);
    return events;
  }

  get bufferedMs() {
    return (this.bufferedFrames * 1000) / this.outputRate;
  }

  // Read from the queue into out[i..end); returns where it stopped.
  _read(out, i, end, events) {
    const outRate = this.outputRate;
    while (i < end && this.queue.length) {
      const head = this.queue[0];
      if (head.end) {
        this.queue.shift();
        this.hasEnd -= 1;
        this.pos = 0;
        events.push({ type: "drained", stream: head.stream, segment: this.segment });
        this.stream = null;
        this.segment = null;
        if (!this.queue.length) {
          this.playing = false;
          this.prebufferFrames = this.initialPrebufferFrames;
        }
        continue;
      }
      if (head.stream !== this.stream || head.segment !== this.segment) {
        const first = head.stream !== this.stream;
        this.stream = head.stream;
        this.segment = head.segment;
        const type = first ? "start" : "segment";
        events.push({ type, stream: head.stream, segment: head.segment });
      }
      const data = head.data;
      const step = head.rate / outRate;
      const start = i;
      if (step === 1 && Number.isInteger(this.pos)) {
        const n = Math.min(end - i, data.length - this.pos);
        out.set(data.subarray(this.pos, this.pos + n), i);
        i += n;
        this.pos += n;
      } else {
        const next = this.queue.length > 1 && !this.queue[1].end ? this.queue[1].data : null;
        while (i < end && this.pos < data.length) {
          const k = Math.floor(this.pos);
          const frac = this.pos - k;
          const a = data[k];
          const b = k + 1 < data.length ? data[k + 1] : next ? next[0] : a;
          out[i++] = a + (b - a) * frac;
          this.pos += step;
        }
      }
      const produced = i - start;
      this.playedFrames += produced;
      this.bufferedFrames = Math.max(0, this.bufferedFrames - produced);
      if (this.pos >= data.length) {
        this.pos -= data.length;
        this.queue.shift();
        if (!this.queue.length || this.queue[0].end) this.pos = 0;
      }
    }
    return i;
  }
}

// Peak and RMS of a block.
export function levels(block) {
  let peak = 0;
  let sum = 0;
  for (let i = 0; i < block.length; i++) {
    const v = block[i];
    const a = v < 0 ? -v : v;
    if (a > peak) peak = a;
    sum += v * v;
  }
  return { peak, rms: block.length ? Math.sqrt(sum / block.length) : 0 };
}

// Builds the periodic status report both players post.
export class Reporter {
  constructor(outputRate, intervalMs = 40) {
    this.interval = Math.round((intervalMs * outputRate) / 1000);
    this.since = 0;
    this.peak = 0;
    this.sum = 0;
    this.count = 0;
  }

  // Account for one rendered block; returns a status object when one is due, else null.
  add(block, buffer) {
    const { peak, rms } = levels(block);
    if (peak > this.peak) this.peak = peak;
    this.sum += rms * rms * block.length;
    this.count += block.length;
    this.since += block.length;
    if (this.since < this.interval) return null;
    const status = {
      type: "status",
      peak: this.peak,
      rms: Math.sqrt(this.sum / Math.max(1, this.count)),
      playing: buffer.playing,
      stream: buffer.stream,
      segment: buffer.segment,
      bufferedMs: buffer.bufferedMs,
      prebufferMs: (buffer.prebufferFrames * 1000) / buffer.outputRate,
      playedFrames: buffer.playedFrames,
      underruns: buffer.underruns,
    };
    this.since = 0;
    this.peak = 0;
    this.sum = 0;
    this.count = 0;
    return status;
  }
}
