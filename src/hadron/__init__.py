"""Hadron: build a minimal musl + systemd Linux distribution from upstream sources."""

__version__ = "0.1.0"

# Bumped whenever the way outputs are produced changes (build-system helpers, sandbox layout,
# output splitting). It is part of every cache key.
BUILD_LOGIC_VERSION = "1"
