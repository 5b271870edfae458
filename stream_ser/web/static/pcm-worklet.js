// AudioWorklet processor: the microphone's samples, mixed to mono, posted in blocks of `frames`
// float32 samples (at the AudioContext's rate) to the page, which sends them to /v1/stream.

class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.frames = options.processorOptions.frames;
    this.block = new Float32Array(this.frames);
    this.filled = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels.length === 0) return true;
    const length = channels[0].length;
    for (let i = 0; i < length; i += 1) {
      let sum = 0;
      for (const channel of channels) sum += channel[i];
      this.block[this.filled] = sum / channels.length;
      this.filled += 1;
      if (this.filled === this.frames) this.#post();
    }
    return true;
  }

  #post() {
    this.port.postMessage(this.block.buffer, [this.block.buffer]);
    this.block = new Float32Array(this.frames);
    this.filled = 0;
  }
}

registerProcessor("pcm-capture", PcmCapture);
