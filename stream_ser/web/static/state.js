// What the page knows, without any DOM: per stream, the results of the last N minutes.
//
// Messages are the published JSON format (schema version 1): results (window, provisional,
// final), speaking and status. A message id seen twice (history replayed after a reconnect,
// or the same result from /v1/events and /v1/stream) is applied once.

export const DEFAULT_MINUTES = 10; // as long as the server's history (600 s)
export const MAX_STREAMS = 16; // beyond this, the stream updated longest ago is forgotten
const MAX_WINDOWS = 4000; // per stream, whatever the span (2 windows a second: 33 minutes)
const STAGE_RANK = { window: 0, provisional: 1, final: 2 };

/** window, provisional or final. */
export function stageOf(message) {
  if (message.type === "window") return "window";
  return message.final ? "final" : "provisional";
}

/** The random per-run part of a message id ({session}:{stream}:{utterance}:{stage}). */
export function sessionOf(message) {
  const colon = message.id.indexOf(":");
  return colon < 0 ? message.id : message.id.slice(0, colon);
}

/** One stream: its timeline items and its latest state. */
export class StreamState {
  constructor(streamId) {
    this.streamId = streamId;
    this.session = null;
    this.windows = []; // window results in arrival order
    this.utterances = new Map(); // utterance_id -> {utteranceId, startMs, endMs, provisional, final}
    this.current = null; // the result the bars show: latest utterance, furthest stage
    this.latestFinal = null;
    this.speaking = false;
    this.counters = {};
    this.countersAt = null; // wall_time of the status they came with
    this.touched = 0; // arrival order of the last message, to forget idle streams first
  }

  /** Forget every result (a new run: stream time starts again at 0). */
  reset(session) {
    this.session = session;
    this.windows = [];
    this.utterances.clear();
    this.current = null;
    this.latestFinal = null;
  }

  /** The latest stream time seen, in ms. */
  get endMs() {
    let end = 0;
    for (const u of this.utterances.values()) end = Math.max(end, u.endMs);
    const last = this.windows[this.windows.length - 1];
    return last ? Math.max(end, last.end_ms) : end;
  }

  /** The earliest stream time still kept, in ms. */
  get startMs() {
    let start = Infinity;
    for (const u of this.utterances.values()) start = Math.min(start, u.startMs);
    if (this.windows.length > 0) start = Math.min(start, this.windows[0].start_ms);
    return Number.isFinite(start) ? start : 0;
  }

  /** Final utterance results kept, oldest first. */
  finals() {
    return [...this.utterances.values()].filter((u) => u.final).map((u) => u.final);
  }

  /** Whether a kept result has this message id (for de-duplication). */
  hasId(id) {
    if (this.windows.some((w) => w.id === id)) return true;
    for (const u of this.utterances.values()) {
      if (u.provisional?.id === id || u.final?.id === id) return true;
    }
    return false;
  }
}

export class Dashboard {
  constructor({ minutes = DEFAULT_MINUTES } = {}) {
    this.keepMs = minutes * 60_000;
    this.streams = new Map();
    this.process = null; // the latest status message
    this.arrivals = 0;
    this.listeners = new Set();
  }

  /** Call `listener(streamId | null)` after each applied message (null: process status). */
  subscribe(listener) {
    this.listeners.add(listener);
  }

  /** Apply one published message; returns false when it was ignored (duplicate or unknown). */
  apply(message) {
    const applied = this.#dispatch(message);
    if (applied !== undefined) for (const listener of this.listeners) listener(applied);
    return applied !== undefined;
  }

  /** The server is out of reach: nobody is known to be speaking, its status is unknown. */
  connectionLost() {
    for (const stream of this.streams.values()) stream.speaking = false;
    this.process = null;
    for (const listener of this.listeners) listener(null);
  }

  #dispatch(message) {
    if (message?.schema_version !== 1) return undefined;
    if (message.type === "window" || message.type === "utterance") return this.#result(message);
    if (message.type === "speaking") return this.#speaking(message);
    if (message.type === "status") return this.#status(message);
    return undefined;
  }

  #stream(streamId) {
    let stream = this.streams.get(streamId);
    if (stream === undefined) {
      stream = new StreamState(streamId);
      this.streams.set(streamId, stream);
      this.#forgetIdleStreams();
    }
    stream.touched = ++this.arrivals;
    return stream;
  }

  #forgetIdleStreams() {
    while (this.streams.size > MAX_STREAMS) {
      let idle = null;
      for (const s of this.streams.values()) if (idle === null || s.touched < idle.touched) idle = s;
      this.streams.delete(idle.streamId);
    }
  }

  #result(message) {
    const stream = this.#stream(message.stream_id);
    const session = sessionOf(message);
    if (stream.session !== session) stream.reset(session);
    else if (stream.hasId(message.id)) return undefined;
    const stage = stageOf(message);
    if (stage === "window") stream.windows.push(message);
    else this.#utterance(stream, message, stage);
    if (isNewer(message, stream.current)) stream.current = message;
    this.#prune(stream);
    return stream.streamId;
  }

  #utterance(stream, message, stage) {
    let entry = stream.utterances.get(message.utterance_id);
    if (entry === undefined) {
      entry = { utteranceId: message.utterance_id, provisional: null, final: null };
      stream.utterances.set(message.utterance_id, entry);
    }
    entry.startMs = message.start_ms;
    entry.endMs = message.end_ms;
    entry[stage] = message;
    if (stage === "final" && isLater(message, stream.latestFinal)) stream.latestFinal = message;
  }

  /** Drop what ended more than N minutes (stream time) before the latest result. */
  #prune(stream) {
    const horizon = stream.endMs - this.keepMs;
    let drop = 0;
    while (drop < stream.windows.length && stream.windows[drop].end_ms < horizon) drop += 1;
    drop = Math.max(drop, stream.windows.length - MAX_WINDOWS);
    if (drop > 0) stream.windows.splice(0, drop);
    for (const [id, u] of stream.utterances) if (u.endMs < horizon) stream.utterances.delete(id);
  }

  #speaking(message) {
    const stream = this.#stream(message.stream_id);
    stream.speaking = message.speaking;
    return stream.streamId;
  }

  #status(message) {
    this.process = message;
    for (const [streamId, counters] of Object.entries(message.per_stream ?? {})) {
      const stream = this.#stream(streamId);
      stream.counters = counters;
      stream.countersAt = message.wall_time;
    }
    return null;
  }
}

/** Whether `message` should replace `current` in the bars: a later utterance, or a further stage. */
function isNewer(message, current) {
  if (current === null) return true;
  if (message.utterance_id !== current.utterance_id) {
    return message.utterance_id > current.utterance_id;
  }
  return STAGE_RANK[stageOf(message)] >= STAGE_RANK[stageOf(current)];
}

function isLater(message, latest) {
  return latest === null || message.utterance_id >= latest.utterance_id;
}
