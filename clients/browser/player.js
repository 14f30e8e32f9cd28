// Plays streamed audio chunks through a JitterBuffer: in an AudioWorklet where the browser has
// one (a secure context: https, or http on localhost), else in a ScriptProcessorNode on the
// main thread. Both report the same events and status objects to `onEvent`.

import { JitterBuffer, Reporter } from "./jitter-buffer.js";

const BUFFER_OPTIONS = { prebufferMs: 200, prebufferStepMs: 100, maxPrebufferMs: 1000 };

function makeContext(sampleRate) {
  // Ask for the stream's rate so that no resampling is needed on our side; the browser converts
  // to the device's rate. Browsers that refuse get their default rate and the buffer resamples.
  try {
    return new AudioContext({ sampleRate, latencyHint: "interactive" });
  } catch {
    return new AudioContext({ latencyHint: "interactive" });
  }
}

export class Player {
  // kind: "worklet" | "script"
  constructor(context, kind, onEvent) {
    this.context = context;
    this.kind = kind;
    this.onEvent = onEvent;
  }

  static async create(sampleRate, onEvent, { forceScript = false } = {}) {
    const context = makeContext(sampleRate);
    if (!forceScript && context.audioWorklet && typeof AudioWorkletNode === "function") {
      try {
        return await WorkletPlayer.start(context, onEvent);
      } catch (err) {
        console.warn("AudioWorklet unavailable, using ScriptProcessorNode:", err);
      }
    }
    return ScriptPlayer.start(context, onEvent);
  }

  get sampleRate() {
    return this.context.sampleRate;
  }

  async resume() {
    if (this.context.state !== "running") await this.context.resume();
  }
}

class WorkletPlayer extends Player {
  static async start(context, onEvent) {
    await context.audioWorklet.addModule(new URL("./player-worklet.js", import.meta.url));
    const node = new AudioWorkletNode(context, "stream-player", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: BUFFER_OPTIONS,
    });
    const player = new WorkletPlayer(context, "worklet", onEvent);
    player.node = node;
    node.port.onmessage = (event) => player.onEvent(event.data);
    node.connect(context.destination);
    return player;
  }

  push(samples, rate, stream, segment) {
    this.node.port.postMessage({ type: "push", samples, rate, stream, segment }, [samples.buffer]);
  }

  end(stream) {
    this.node.port.postMessage({ type: "end", stream });
  }

  flush() {
    this.node.port.postMessage({ type: "flush" });
  }
}

class ScriptPlayer extends Player {
  static start(context, onEvent) {
    const player = new ScriptPlayer(context, "script", onEvent);
    player.buffer = new JitterBuffer(context.sampleRate, BUFFER_OPTIONS);
    player.reporter = new Reporter(context.sampleRate);
    const node = context.createScriptProcessor(1024, 1, 1);
    node.onaudioprocess = (event) => {
      const out = event.outputBuffer.getChannelData(0);
      for (const ev of player.buffer.render(out)) player.onEvent(ev);
      const status = player.reporter.add(out, player.buffer);
      if (status) player.onEvent(status);
    };
    node.connect(context.destination);
    player.node = node;
    return player;
  }

  push(samples, rate, stream, segment) {
    this.buffer.push(samples, rate, stream, segment);
  }

  end(stream) {
    this.buffer.end(stream);
  }

  flush() {
    this.buffer.flush();
    this.onEvent({ type: "flushed" });
  }
}
