// Small helpers to build HTML and SVG elements (text always goes in as text, never as markup).

const SVG_NS = "http://www.w3.org/2000/svg";

/** An HTML element with attributes and optional text. */
export function html(tag, attributes = {}, text = null) {
  return decorate(document.createElement(tag), attributes, text);
}

/** An SVG element with attributes and optional text. */
export function svg(tag, attributes = {}, text = null) {
  return decorate(document.createElementNS(SVG_NS, tag), attributes, text);
}

function decorate(element, attributes, text) {
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  if (text !== null) element.textContent = text;
  return element;
}

/** Stream time in ms as m:ss.s. */
export function formatMs(ms) {
  const seconds = ms / 1000;
  const minutes = Math.floor(seconds / 60);
  const rest = (seconds - minutes * 60).toFixed(1).padStart(4, "0");
  return `${minutes}:${rest}`;
}

/** A signed number with two decimals, or a dash for null. */
export function signed(value) {
  if (value === null || value === undefined) return "–";
  return (value >= 0 ? "+" : "−") + Math.abs(value).toFixed(2);
}

/** A result's top label and its probability, e.g. "happy 31 %". */
export function topOf(result) {
  return `${result.top_label} ${percent(result.top_probability)}`;
}

/** A counter or field name in words. */
export function words(name) {
  return name.replaceAll("_", " ");
}

/** A probability as a whole percentage. */
export function percent(p) {
  return `${Math.round(p * 100)} %`;
}
