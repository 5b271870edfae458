#!/usr/bin/env bash
# Re-creates samples/speech.flac (needs the Debian packages espeak-ng and sox).
set -euo pipefail
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
espeak-ng -v en-us -s 150 -w "$tmp/s1.wav" \
  "Hello there. I am so happy to see you today, this is wonderful news."
espeak-ng -v en-us -s 130 -p 30 -w "$tmp/s2.wav" \
  "Why did you do that? I told you not to touch it. Now everything is broken."
espeak-ng -v en-us -s 120 -p 20 -w "$tmp/s3.wav" \
  "I miss the old days. Nothing feels the same anymore."
sox "$tmp/s1.wav" -r 16000 -c 1 -b 16 "$tmp/a.wav" pad 0.3 0.9
sox "$tmp/s2.wav" -r 16000 -c 1 -b 16 "$tmp/b.wav" pad 0 0.9
sox "$tmp/s3.wav" -r 16000 -c 1 -b 16 "$tmp/c.wav" pad 0 0.5
sox "$tmp/a.wav" "$tmp/b.wav" "$tmp/c.wav" "$(dirname "$0")/../samples/speech.flac"
