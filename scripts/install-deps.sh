#!/usr/bin/env bash
# Installs the system packages weft needs to build and test, quietly and idempotently.
set -euo pipefail
pkgs=(protobuf-compiler libprotobuf-dev etcd-server etcd-client containernetworking-plugins iptables nftables
      iproute2 iperf3 iputils-ping openssl procps psmisc curl golang-go golang-github-appc-cni-dev
      wireguard-go wireguard-tools clang)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's etcd-server package may start a system etcd on loopback when installed; tests run
# their own servers inside namespaces, so stop one the install just started.
if [[ " ${missing[*]-} " == *" etcd-server "* ]] && command -v systemctl >/dev/null 2>&1; then
  systemctl stop etcd >/dev/null 2>&1 || true
fi
# tests/apiserver.rs drives the test API server with kubectl: an upstream kubectl 1.32 binary
# (not installed from apt here).
command -v kubectl >/dev/null 2>&1 || echo "note: kubectl not found; tests/apiserver.rs needs kubectl 1.32 in PATH" >&2
exit 0
