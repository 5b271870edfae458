"""Test fakes: tiny random ALM checkpoints and a fake OpenAI-compatible ALM server."""
