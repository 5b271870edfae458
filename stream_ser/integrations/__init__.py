"""Plug-ins for other frameworks; each module needs its own extra (e.g. `stream-ser[pipecat]`)."""
