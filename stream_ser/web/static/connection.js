// WebSocket URLs (with the page's token) and a socket that reconnects by itself with backoff.

const MIN_DELAY_MS = 500;
export const REFUSED = 1008; // the server's close code for a missing or wrong token
const MAX_DELAY_MS = 10_000;

/** ws(s):// URL of an API path relative to the page, with query parameters (null ones left out). */
export function socketUrl(path, params = {}) {
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined) url.searchParams.set(name, String(value));
  }
  return url.toString();
}

/** The delay before reconnection attempt `attempt` (1, 2, ...): doubling, capped, with jitter. */
export function backoffMs(attempt, random = Math.random) {
  const ceiling = Math.min(MAX_DELAY_MS, MIN_DELAY_MS * 2 ** (attempt - 1));
  return Math.round(ceiling * (0.5 + random() / 2));
}

/**
 * Keeps one WebSocket open to `url`: JSON text frames go to onMessage(object); every change goes
 * to onState({state: "connecting" | "connected" | "reconnecting", attempt, delayMs, code, reason}).
 */
export class ReconnectingSocket {
  constructor(url, { onMessage, onState }) {
    this.url = url;
    this.onMessage = onMessage;
    this.onState = onState;
    this.attempt = 0;
    this.socket = null;
  }

  start() {
    this.onState({ state: "connecting", attempt: 0 });
    this.#connect();
  }

  #connect() {
    const socket = new WebSocket(this.url);
    this.socket = socket;
    socket.onopen = () => {
      this.attempt = 0;
      this.onState({ state: "connected", attempt: 0 });
    };
    socket.onmessage = (event) => {
      if (typeof event.data === "string") this.onMessage(JSON.parse(event.data));
    };
    socket.onclose = (event) => this.#retry(event.code, event.reason);
  }

  #retry(code, reason) {
    this.attempt += 1;
    const delayMs = backoffMs(this.attempt);
    this.onState({ state: "reconnecting", attempt: this.attempt, delayMs, code, reason });
    setTimeout(() => this.#connect(), delayMs);
  }
}
