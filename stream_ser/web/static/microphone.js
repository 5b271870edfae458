// "Use this browser's microphone": getUserMedia + an AudioWorklet, streamed as float32 PCM at the
// AudioContext's rate over /v1/stream as a new stream; that stream's messages come back.

import { socketUrl } from "./connection.js";

const BLOCK_S = 0.05; // audio per WebSocket frame
const MAX_BUFFERED_S = 2; // audio waiting in the socket beyond this is dropped and counted
const CAPTURE = { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false };

/** Whether this page may ask for the microphone (a secure context: https or localhost). */
export function microphoneAvailable() {
  return window.isSecureContext && navigator.mediaDevices?.getUserMedia !== undefined;
}

export class Microphone {
  /** onMessage(object) gets the stream's messages; onState({state, streamId, level, dropped, reason}). */
  constructor({ token, onMessage, onState }) {
    this.token = token;
    this.onMessage = onMessage;
    this.onState = onState;
    this.streamId = `browser-${Math.random().toString(16).slice(2, 8)}`;
    this.dropped = 0; // blocks not sent because the socket was too far behind
    this.stopping = false;
  }

  async start() {
    this.onState({ state: "starting", streamId: this.streamId });
    this.media = await navigator.mediaDevices.getUserMedia({ audio: CAPTURE });
    this.context = new AudioContext();
    await this.context.resume();
    await this.context.audioWorklet.addModule(new URL("./pcm-worklet.js", import.meta.url));
    this.socket = await this.#open(this.context.sampleRate);
    const frames = Math.round(this.context.sampleRate * BLOCK_S);
    const options = { numberOfOutputs: 0, processorOptions: { frames } };
    this.node = new AudioWorkletNode(this.context, "pcm-capture", options);
    this.node.port.onmessage = (event) => this.#send(event.data);
    this.context.createMediaStreamSource(this.media).connect(this.node);
    this.onState({ state: "live", streamId: this.streamId, level: 0, dropped: 0 });
  }

  /**
   * Stop capturing and end the stream: the server flushes the last utterance, sends the
   * remaining results on this socket, then closes it.
   */
  stop(reason = "stopped") {
    this.stopping = true;
    for (const track of this.media?.getTracks() ?? []) track.stop();
    this.node?.disconnect();
    if (this.context !== undefined && this.context.state !== "closed") this.context.close();
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify({ type: "end" }));
    this.onState({ state: "stopped", streamId: this.streamId, reason });
  }

  #open(rate) {
    const params = { rate, channels: 1, format: "f32le", stream_id: this.streamId, token: this.token };
    const socket = new WebSocket(socketUrl("v1/stream", params));
    socket.binaryType = "arraybuffer";
    socket.onmessage = (event) => {
      if (typeof event.data === "string") this.onMessage(JSON.parse(event.data));
    };
    return new Promise((resolve, reject) => {
      socket.onopen = () => {
        socket.onclose = (event) => this.#closed(event);
        resolve(socket);
      };
      socket.onclose = (event) => {
        reject(new Error(event.reason || `the server refused the stream (code ${event.code})`));
      };
    });
  }

  #send(buffer) {
    if (this.socket.readyState !== WebSocket.OPEN) return;
    if (this.socket.bufferedAmount > MAX_BUFFERED_S * this.context.sampleRate * 4) this.dropped += 1;
    else this.socket.send(buffer);
    const samples = new Float32Array(buffer);
    let energy = 0;
    for (const sample of samples) energy += sample * sample;
    const level = Math.sqrt(energy / samples.length);
    this.onState({ state: "live", streamId: this.streamId, level, dropped: this.dropped });
  }

  #closed(event) {
    if (!this.stopping) this.stop(`the server closed the stream: ${event.reason || `code ${event.code}`}`);
  }
}
