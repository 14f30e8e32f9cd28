// The AudioWorklet side of the player: a JitterBuffer fed over the node's port.
// Messages in:  {type: "push", samples: Float32Array, rate, stream, segment}
//               {type: "end", stream} | {type: "flush"}
// Messages out: the buffer's events ({type: "start" | "segment" | "underrun" | "drained", ...}),
//               {type: "flushed"}, and a {type: "status", ...} report every 40 ms.

import { JitterBuffer, Reporter } from "./jitter-buffer.js";

class StreamPlayerProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    // `sampleRate` is a global of the AudioWorkletGlobalScope: the context's rate.
    this.buffer = new JitterBuffer(sampleRate, options.processorOptions || {});
    this.reporter = new Reporter(sampleRate);
    this.port.onmessage = (event) => this.receive(event.data);
  }

  receive(message) {
    switch (message.type) {
      case "push":
        this.buffer.push(message.samples, message.rate, message.stream, message.segment);
        break;
      case "end":
        this.buffer.end(message.stream);
        break;
      case "flush":
        this.buffer.flush();
        this.port.postMessage({ type: "flushed" });
        break;
    }
  }

  process(inputs, outputs) {
    const channels = outputs[0];
    const out = channels[0];
    for (const event of this.buffer.render(out)) this.port.postMessage(event);
    for (let c = 1; c < channels.length; c++) channels[c].set(out);
    const status = this.reporter.add(out, this.buffer);
    if (status) this.port.postMessage(status);
    return true;
  }
}

registerProcessor("stream-player", StreamPlayerProcessor);
