// The drawn parts of a stream card: distribution bars, the timeline and the arousal/valence plane.

import { labelColor } from "./colors.js";
import { formatMs, html, percent, svg, topOf } from "./dom.js";
import { stageOf } from "./state.js";

const WIDTH = 1000; // timeline viewBox units
const MIN_SPAN_MS = 10_000;
const DEFAULT_HOP_MS = 500;

/** One row per label: name, a bar as long as its probability, the percentage. */
export function drawBars(container, result) {
  container.replaceChildren();
  if (result === null) return;
  for (const [label, p] of Object.entries(result.distribution)) {
    const fill = html("span", { class: "fill" });
    fill.style.width = `${(p * 100).toFixed(1)}%`;
    fill.style.background = labelColor(label);
    const row = html("div", { class: "bar", "data-label": label });
    if (label === result.top_label) row.classList.add("top");
    const track = html("span", { class: "track" });
    track.append(fill);
    row.append(html("span", { class: "name" }, label), track, html("span", { class: "p" }, percent(p)));
    container.append(row);
  }
}

/** What the bars show: stage, utterance and stream time. */
export function describeResult(result) {
  if (result === null) return "no result yet";
  const span = `${formatMs(result.start_ms)}–${formatMs(result.end_ms)}`;
  return `${stageOf(result)} · utterance ${result.utterance_id} · ${span}`;
}

/**
 * The timeline: windows as faint columns (height = top probability), each utterance's
 * provisional result as a thin dashed band and its final as a solid band below it.
 * Returns the stream time span drawn, in ms.
 */
export function drawTimeline(element, stream) {
  const startMs = stream.startMs;
  const endMs = Math.max(stream.endMs, startMs + MIN_SPAN_MS);
  const x = (ms) => ((ms - startMs) / (endMs - startMs)) * WIDTH;
  const shapes = [...windowColumns(stream.windows, x), ...utteranceBands(stream.utterances, x)];
  element.replaceChildren(...shapes);
  return { startMs, endMs };
}

function windowColumns(windows, x) {
  return windows.map((w, i) => {
    const previous = windows[i - 1];
    const hop = previous?.utterance_id === w.utterance_id ? w.end_ms - previous.end_ms : DEFAULT_HOP_MS;
    const centre = (w.start_ms + w.end_ms) / 2;
    const height = 30 * w.top_probability;
    const column = svg("rect", {
      class: "window", x: x(centre - hop / 2), y: 32 - height,
      width: Math.max(x(centre + hop / 2) - x(centre - hop / 2), 1), height,
      fill: labelColor(w.top_label),
    });
    column.append(svg("title", {}, `window ${formatMs(w.end_ms)}: ${topOf(w)}`));
    return column;
  });
}

function utteranceBands(utterances, x) {
  const shapes = [];
  for (const u of utterances.values()) {
    for (const [stage, y, height] of [["provisional", 36, 6], ["final", 44, 18]]) {
      const result = u[stage];
      if (result === null) continue;
      const band = svg("rect", {
        class: `utterance ${stage}`, "data-utterance": u.utteranceId,
        x: x(result.start_ms), y, width: Math.max(x(result.end_ms) - x(result.start_ms), 2), height,
        fill: labelColor(result.top_label), stroke: labelColor(result.top_label),
      });
      band.append(svg("title", {}, `utterance ${u.utteranceId} (${stage}): ${topOf(result)}`));
      shapes.push(band);
    }
  }
  return shapes;
}

/** The arousal/valence plane: the current result as a dot, the latest final as a ring. */
export function drawAffect(element, current, final) {
  const shapes = [
    svg("circle", { class: "frame", cx: 50, cy: 50, r: 46 }),
    svg("line", { class: "axis", x1: 4, y1: 50, x2: 96, y2: 50 }),
    svg("line", { class: "axis", x1: 50, y1: 4, x2: 50, y2: 96 }),
    svg("text", { x: 50, y: 11, class: "tick" }, "aroused"),
    svg("text", { x: 50, y: 94, class: "tick" }, "sleepy"),
    svg("text", { x: 95, y: 47, class: "tick end" }, "pleasant"),
    svg("text", { x: 5, y: 47, class: "tick start" }, "unpleasant"),
  ];
  for (const [result, kind] of [[final, "final"], [current, "current"]]) {
    if (result === null || result.arousal === null || result.valence === null) continue;
    shapes.push(svg("circle", {
      class: `point ${kind}`, cx: 50 + 44 * result.valence, cy: 50 - 44 * result.arousal,
      r: kind === "final" ? 6 : 4, fill: labelColor(result.top_label), stroke: labelColor(result.top_label),
    }));
  }
  element.replaceChildren(...shapes);
}
