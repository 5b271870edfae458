// The page: one card per stream, redrawn at most once per animation frame.

import { describeResult, drawAffect, drawBars, drawTimeline } from "./charts.js";
import { labelColor } from "./colors.js";
import { formatMs, html, signed, svg, topOf, words } from "./dom.js";
import { stageOf } from "./state.js";

const BASELINE_WORDS = { population: "relative to the population", speaker: "relative to this speaker" };

/** One stream's card, built once and updated in place. */
class StreamCard {
  constructor(streamId) {
    this.root = html("section", { class: "stream", "data-stream": streamId });
    this.speaking = html("span", { class: "speaking", "data-speaking": "false" }, "silent");
    this.top = html("span", { class: "top-label" });
    const title = html("h2", {}, streamId);
    this.caption = html("p", { class: "caption" });
    this.bars = html("div", { class: "bars" });
    this.affect = svg("svg", { class: "affect", viewBox: "0 0 100 100", role: "img" });
    this.affectText = html("p", { class: "affect-values" });
    this.descriptors = html("div", { class: "descriptors" });
    this.timeline = svg("svg", { class: "timeline", viewBox: "0 0 1000 64", preserveAspectRatio: "none" });
    this.axis = html("div", { class: "time-axis" });
    const key = html("span", {}, "windows faint · provisional dashed · final solid");
    this.axis.append(html("span"), key, html("span"));
    this.counters = html("div", { class: "counters" });
    const header = html("header");
    header.append(title, this.speaking, this.top);
    const now = html("div", { class: "now" });
    now.append(
      column("distribution", this.caption, this.bars),
      column("arousal / valence", this.affect, this.affectText),
      column("latest final", this.descriptors),
    );
    this.root.append(header, now, this.timeline, this.axis, this.counters);
  }

  update(stream) {
    this.speaking.dataset.speaking = String(stream.speaking);
    this.speaking.textContent = stream.speaking ? "speaking" : "silent";
    const current = stream.current;
    this.top.textContent = current === null ? "" : topOf(current);
    this.top.style.color = current === null ? "" : labelColor(current.top_label);
    this.caption.textContent = describeResult(current);
    this.caption.dataset.stage = current === null ? "" : stageOf(current);
    drawBars(this.bars, current);
    drawAffect(this.affect, current, stream.latestFinal);
    this.affectText.textContent = current === null
      ? "" : `arousal ${signed(current.arousal)} · valence ${signed(current.valence)}`;
    drawDescriptors(this.descriptors, stream.latestFinal);
    const { startMs, endMs } = drawTimeline(this.timeline, stream);
    this.axis.children[0].textContent = formatMs(startMs);
    this.axis.children[2].textContent = formatMs(endMs);
    drawCounters(this.counters, stream.counters, stream.countersAt);
  }
}

function column(title, ...children) {
  const box = html("div", { class: "column" });
  box.append(html("h3", {}, title), ...children);
  return box;
}

/** The latest final in words: its label, each descriptor's level, and its flags. */
function drawDescriptors(container, final) {
  container.replaceChildren();
  if (final === null) {
    container.append(html("p", { class: "muted" }, "no final result yet"));
    return;
  }
  const span = `${formatMs(final.start_ms)}–${formatMs(final.end_ms)}`;
  const heading = `utterance ${final.utterance_id} (${span}): ${topOf(final)}`;
  container.append(html("p", { class: "final-label" }, heading));
  const descriptors = final.descriptors;
  if (descriptors === undefined) container.append(html("p", { class: "muted" }, "no descriptors"));
  else if (descriptors.voiced === false) container.append(html("p", { class: "muted" }, "no voiced speech"));
  else container.append(descriptorWords(descriptors));
  for (const flag of final.flags ?? []) container.append(html("span", { class: "flag" }, words(flag)));
}

function descriptorWords(descriptors) {
  const list = html("p", { class: "words" });
  for (const [name, d] of Object.entries(descriptors)) {
    if (typeof d !== "object" || d === null) continue;
    const title = `z ${signed(d.z)}, value ${d.value}`;
    const word = html("span", { class: "word", title }, `${name} ${d.level}`);
    if (Math.abs(d.z) >= 1) word.classList.add("marked");
    list.append(word);
  }
  list.append(html("span", { class: "muted" }, BASELINE_WORDS[descriptors.baseline] ?? ""));
  return list;
}

function drawCounters(container, counters, at) {
  container.replaceChildren();
  if (at === null) return;
  const time = new Date(at).toLocaleTimeString();
  container.append(html("span", { class: "at" }, `status at ${time}:`));
  for (const [name, value] of Object.entries(counters)) {
    const item = html("span", { "data-counter": name }, `${words(name)} `);
    item.append(html("b", {}, formatCount(value)));
    container.append(item);
  }
}

function formatCount(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

/** Every card, the legend and the process line; redraws what changed once per frame. */
export class View {
  constructor(dashboard, { streams, legend, process, empty }) {
    this.dashboard = dashboard;
    this.elements = { streams, legend, process, empty };
    this.cards = new Map();
    this.dirty = new Set();
    this.processDirty = false;
    this.frame = null;
    this.labels = new Set();
    dashboard.subscribe((streamId) => this.#schedule(streamId));
  }

  #schedule(streamId) {
    if (streamId === null) {
      this.processDirty = true;
      for (const id of this.dashboard.streams.keys()) this.dirty.add(id);
    } else {
      this.dirty.add(streamId);
    }
    this.frame ??= requestAnimationFrame(() => this.#render());
  }

  #render() {
    this.frame = null;
    for (const streamId of this.dirty) this.#renderStream(streamId);
    this.dirty.clear();
    for (const [streamId, card] of this.cards) {
      if (this.dashboard.streams.has(streamId)) continue;
      card.root.remove();
      this.cards.delete(streamId);
    }
    if (this.processDirty) this.#renderProcess();
    this.processDirty = false;
    this.elements.empty.hidden = this.cards.size > 0;
  }

  #renderStream(streamId) {
    const stream = this.dashboard.streams.get(streamId);
    if (stream === undefined) return;
    let card = this.cards.get(streamId);
    if (card === undefined) {
      card = new StreamCard(streamId);
      this.cards.set(streamId, card);
      this.elements.streams.append(card.root);
    }
    card.update(stream);
    this.#extendLegend(stream.current);
  }

  #extendLegend(result) {
    for (const label of Object.keys(result?.distribution ?? {})) {
      if (this.labels.has(label)) continue;
      this.labels.add(label);
      const swatch = html("span", { class: "swatch" });
      swatch.style.background = labelColor(label);
      const entry = html("span", { class: "legend-entry" });
      entry.append(swatch, label);
      this.elements.legend.append(entry);
    }
  }

  #renderProcess() {
    const status = this.dashboard.process;
    const element = this.elements.process;
    if (status === null) {
      element.textContent = "";
      return;
    }
    element.dataset.state = status.state;
    const counters = Object.entries(status.counters).map(([k, v]) => `${words(k)} ${formatCount(v)}`);
    element.textContent = `server ${status.state} · ${status.streams.length} stream(s)`;
    element.title = counters.join("\n");
  }
}
