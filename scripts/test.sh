#!/usr/bin/env bash
# The project's test command (README). Idempotent; installs what the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

# The GUI tests (egui_kittest with the wgpu renderer) need a software Vulkan/GL adapter at run
# time: Mesa's lavapipe/llvmpipe (shared/design/HEADLESS_GUI.md). Install them when missing and
# when we can (root or passwordless sudo); nothing is built against them.
PKGS="mesa-vulkan-drivers libvulkan1 libegl1 libegl-mesa0 libgl1-mesa-dri libxkbcommon-x11-0 libx11-xcb1 libfontconfig1"
missing=""
if command -v dpkg-query >/dev/null 2>&1; then
  for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
fi
if [ -n "$missing" ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  echo "installing the GUI tests' run-time packages:$missing"
  if ! ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing); then
    echo "warning: could not install$missing; the GUI tests need a Vulkan or GL adapter" >&2
  fi
fi

# Keep the tests' feature bank and runs out of the user's cache.
export TEXTREFINER_CACHE="${TEXTREFINER_CACHE:-$(mktemp -d)}"
# Wayland/X sockets are not needed by the headless tests; silence winit's complaint.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

# Core first (no GUI dependencies), then the whole package with the default `gui` feature.
cargo test --no-default-features
cargo test
