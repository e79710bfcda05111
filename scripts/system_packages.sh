#!/usr/bin/env bash
# The Debian packages headless Qt/OpenGL (napari under Xvfb) needs; installs only what is missing, as root.
set -euo pipefail
debs="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxcb-image0 libxcb-render-util0
      libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libxcb-xkb1 libxkbcommon-x11-0 libegl1 libgl1
      libgl1-mesa-dri libfontconfig1 libdbus-1-3 libglib2.0-0"
missing=""
for pkg in $debs; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "setup: warning: missing Debian packages (GUI tests need them):$missing" >&2
    exit 0
fi
echo "setup: installing Debian packages:$missing"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
