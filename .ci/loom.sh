#!/usr/bin/env bash
# Loom model check of the per-key lock / single-flight protocol (tests/loom_model.rs).
#
# `--cfg loom` applies to every crate in the build, so it gets its own target directory (sharing
# one with ordinary builds would rebuild everything each time the flags change). Bounds:
# LOOM_MAX_PREEMPTIONS=3 explores ~105k interleavings in ~7 s on 2 cores (plus the first build);
# 4 explores ~850k in ~1 min. Override either variable from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}"
export CARGO_TARGET_DIR="${LOOM_TARGET_DIR:-target/loom}"

RUSTFLAGS="--cfg loom" cargo test --test loom_model --release
