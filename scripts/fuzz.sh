#!/usr/bin/env bash
# Runs every libFuzzer target in fuzz/ for a bounded time (default 30 s each) from the seed
# corpus kept in fuzz/corpus/<target>/; fails on the first crash, leak or timeout, with the
# crashing input left in fuzz/artifacts/<target>/.
#   scripts/fuzz.sh                  all targets, 30 s each
#   FUZZ_SECONDS=300 scripts/fuzz.sh lease cni_stdin
# Stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly flags; `-s none`
# builds without a sanitizer (the targets are safe Rust; libFuzzer still finds panics).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-30}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz (once, a few minutes)"
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
start=$SECONDS
# New inputs go to a scratch directory: the repo keeps its small seed corpus unchanged.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "$scratch/$t"
    if ! cargo fuzz run -s none "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
        tail -n 40 "$scratch/$t.log"
        echo "fuzz target $t FAILED; the input is in fuzz/artifacts/$t/; reproduce with:"
        echo "  cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -s none $t artifacts/$t/<file>"
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$t.log" | tail -n 1)
    echo "fuzz $t: ${seconds}s, ${runs:-?} inputs, no crash"
done
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crash ($((SECONDS - start))s in all, build included)"
