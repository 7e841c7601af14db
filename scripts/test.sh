#!/usr/bin/env bash
# The project's test command (README). Idempotent; installs what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
# Core first (no GUI dependencies), then the whole package with the default `gui` feature.
cargo test --no-default-features
cargo test
