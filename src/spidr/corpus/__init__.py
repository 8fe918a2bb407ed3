"""A built-in, phone-aligned, multi-speaker synthetic speech corpus (flite / festival / espeak-ng)."""
