// The dashboard page: /v1/events feeds the state, the view draws it, the button adds a microphone.

import { REFUSED, ReconnectingSocket, socketUrl } from "./connection.js";
import { Microphone, microphoneAvailable } from "./microphone.js";
import { DEFAULT_MINUTES, Dashboard } from "./state.js";
import { View } from "./view.js";

const params = new URLSearchParams(location.search);
const token = params.get("token"); // passed on to the WebSockets (browsers cannot set their headers)
const byId = (id) => document.getElementById(id);

const dashboard = new Dashboard({ minutes: Number(params.get("minutes")) || DEFAULT_MINUTES });
new View(dashboard, {
  streams: byId("streams"), legend: byId("legend"), process: byId("process"), empty: byId("empty"),
});

const events = new ReconnectingSocket(socketUrl("v1/events", { token }), {
  onMessage: (message) => dashboard.apply(message),
  onState: (change) => {
    showConnection(byId("connection"), change);
    if (change.state === "reconnecting") dashboard.connectionLost();
  },
});
events.start();

function showConnection(element, { state, attempt, delayMs, code, reason }) {
  element.dataset.state = state;
  element.textContent = state;
  if (state === "reconnecting") {
    const next = `attempt ${attempt}, next in ${(delayMs / 1000).toFixed(1)} s`;
    const refused = code === REFUSED ? `refused: ${reason || "missing or wrong token"}; ` : "";
    element.textContent = `reconnecting (${refused}${next})`;
  }
  element.title = reason || (code ? `closed with code ${code}` : "");
}

const button = byId("mic");
const micState = byId("mic-state");
const micLevel = byId("mic-level");
let microphone = null;

if (!microphoneAvailable()) {
  button.disabled = true;
  micState.textContent = "the microphone needs https or localhost";
}

button.addEventListener("click", async () => {
  if (microphone !== null) {
    microphone.stop();
    return;
  }
  microphone = new Microphone({ token, onMessage: (m) => dashboard.apply(m), onState: showMicrophone });
  try {
    await microphone.start();
  } catch (error) {
    microphone.stop(error.message);
  }
});

function showMicrophone({ state, streamId, level, dropped, reason }) {
  micState.dataset.state = state;
  if (state === "stopped") {
    micLevel.hidden = true;
    microphone = null;
    button.textContent = "Use this browser's microphone";
    micState.textContent = reason === "stopped" ? "" : reason;
    return;
  }
  button.textContent = "Stop the microphone";
  micLevel.hidden = state !== "live";
  if (state === "live") micLevel.firstElementChild.style.width = `${levelPercent(level)}%`;
  const drops = dropped > 0 ? ` · ${dropped} block(s) dropped` : "";
  micState.textContent = `${state} as stream ${streamId}${drops}`;
}

/** An RMS level on a -60..0 dBFS scale, in percent. */
function levelPercent(rms) {
  const db = 20 * Math.log10(Math.max(rms, 1e-6));
  return Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
}

window.streamSer = { dashboard, events }; // for the tests and the browser console
