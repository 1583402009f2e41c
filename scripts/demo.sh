#!/usr/bin/env bash
# Installs what is missing, builds weft, and shows it at work inside network namespaces:
# a LAN with three hosts, one `weft daemon` per host sharing the embedded local store, their
# subnet.env files, health, metrics and the lease table. Everything is removed at the end,
# also on failure or Ctrl-C. Nothing outside the namespaces it creates is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --locked -q
weft="$PWD/target/release/weft"
p=weftdemo-
dir=$(mktemp -d)
cleanup() {
  for ns in $(ip netns list | awk '{print $1}' | grep "^$p" || true); do
    for pid in $(ip netns pids "$ns"); do kill "$pid" 2>/dev/null || true; done
    sleep 0.2; for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns"
  done
  rm -rf "$dir"
}
trap cleanup EXIT
# Quiet the shell's "Terminated" notices for the daemons stopped by cleanup.
set +m
cleanup; dir=$(mktemp -d)
echo '{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}' > "$dir/net-conf.json"
ip netns add ${p}lan
ip -n ${p}lan link add br0 type bridge
ip -n ${p}lan addr add 192.0.2.1/24 dev br0
ip -n ${p}lan link set br0 up
for i in 1 2 3; do
  h=${p}h$i
  ip netns add "$h"
  ip -n "$h" link set lo up
  ip -n "$h" link add eth0 type veth peer name h$i netns ${p}lan
  ip -n ${p}lan link set h$i master br0 up
  ip -n "$h" addr add 192.0.2.1$i/24 dev eth0
  ip -n "$h" link set eth0 up
  ip -n "$h" route add default via 192.0.2.1
  ip netns exec "$h" "$weft" daemon --store=local --local-store="$dir/leases.db" \
    --net-config-path="$dir/net-conf.json" --subnet-file="$dir/h$i.env" --healthz-port=8081 \
    2>"$dir/h$i.log" &
done
for i in 1 2 3; do
  for _ in $(seq 100); do [ -s "$dir/h$i.env" ] && break; sleep 0.1; done
  echo "== host $i (192.0.2.1$i): subnet.env"; cat "$dir/h$i.env"
done
sleep 0.5
echo "== host 1: /readyz: $(ip netns exec ${p}h1 curl -s localhost:8081/readyz)"
echo "== host 1: peers known: $(ip netns exec ${p}h1 curl -s localhost:8081/metrics | awk '/^weft_peers /{print $2}')"
echo "== weft leases"
"$weft" leases --store=local --local-store="$dir/leases.db"
