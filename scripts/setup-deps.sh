#!/usr/bin/env bash
# Installs the Debian 12 packages Keel builds against, only those that are missing.
# Runs as root (or through sudo when it is there). Prints what it installs.
set -euo pipefail
pkgs=(build-essential cmake pkgconf libcaf-dev capnproto libcapnp-dev librocksdb-dev
      libboost-test-dev libicu-dev libedit-dev libssl-dev openssl ccache ninja-build
      nlohmann-json3-dev curl python3 prometheus)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-deps: all packages present"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "setup-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
