"""Bundled specialist models: one folder each with model.onnx, card.json and README.md."""
