// One colour per emotion label, the same in every stream, the bars, the timeline and the legend.

const KNOWN = {
  neutral: "#9e9e9e",
  calm: "#26a69a",
  happy: "#f9a825",
  sad: "#1e88e5",
  angry: "#e53935",
  fearful: "#8e24aa",
  disgust: "#43a047",
  surprise: "#fb8c00",
  boredom: "#8d6e63",
};

/** The colour of a label (a stable hue from its name when it is not one of the usual ones). */
export function labelColor(label) {
  if (label in KNOWN) return KNOWN[label];
  let hash = 0;
  for (const char of label) hash = (hash * 31 + char.codePointAt(0)) % 360;
  return `hsl(${hash}, 55%, 50%)`;
}
