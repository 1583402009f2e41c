#!/usr/bin/env bash
# The main job: install what is missing, build weft, bring up a lab (3 hosts x 2 pods,
# vxlan, embedded store; all inside network namespaces) and check that every pod reaches
# every other pod and the outside host. Extra arguments go to `weft lab up`
# (e.g. --backend host-gw --store etcd). The lab stays up: remove it with
#   target/release/weft lab down
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --locked -q
weft="$PWD/target/release/weft"
name=weft
for ((i = 1; i <= $#; i++)); do
  case "${!i}" in
    --name=*) name="${!i#--name=}" ;;
    --name) j=$((i + 1)); name="${!j}" ;;
  esac
done
"$weft" lab down --name "$name" >/dev/null
"$weft" lab up "$@"
"$weft" lab check --name "$name"
echo
echo "Try: $weft lab status | $weft lab bench --all | $weft lab restart 2 | $weft lab down"
