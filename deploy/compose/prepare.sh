#!/usr/bin/env bash
# Makes what compose.yaml mounts, under ./local/ beside it (or --out DIR): a federation CA
# and the coordinator's certificate (for the name `coordinator`), the run configuration and
# a generated vocabulary, and three sites, each with its own key made in its own folder
# (`fedflow-client enrol-request`) and its certificate signed by the CA (`pki sign`), its
# site.toml and a backfill of generated feedback (`data import` it, or post it). The CA's
# key stays in local/pki; nothing a site holds leaves its folder but its request.
#
# Usage: deploy/compose/prepare.sh [--out DIR] [--bin-dir DIR]
#   --bin-dir DIR  take the binaries from DIR (default: build them with cargo --release)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/local" bin_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --bin-dir) bin_dir="$2"; shift 2 ;;
    *) echo "prepare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$bin_dir" ]; then
  (cd "$here/../.." && cargo build --release --locked -p fedflow-coordinator -p fedflow-client >&2)
  bin_dir="${CARGO_TARGET_DIR:-$here/../../target}/release"
fi
fco="$bin_dir/fedflow-coordinator" fc="$bin_dir/fedflow-client"
[ -e "$out" ] && { echo "prepare.sh: $out exists: remove it first" >&2; exit 1; }
mkdir -p "$out/coordinator" "$out/sites"

"$fc" data generate --out "$out/data" --sites 3 --sessions 3000 >&2
cp "$out/data/vocab.json" "$out/coordinator/vocab.json"
cat > "$out/coordinator/run.toml" <<'TOML'
# The compose federation's run: three sites, continuous, the evaluation publish gate.
[run]
name = "compose"
seed = 7
rounds = 1000

[model]
vocab = "vocab.json"

[schedule]
mode = "continuous"
interval_secs = 60

[sampling]
fraction = 1.0
min_selected = 3
min_available = 3

[rounds]
deadline_secs = 600
min_completed = 3
TOML
"$fco" check-config "$out/coordinator/run.toml" >/dev/null

"$fco" pki init --dir "$out/pki" >&2
"$fco" pki server --dir "$out/pki" --name coordinator --name localhost --name 127.0.0.1 \
  --out "$out/pki/coordinator" >&2
i=0
for site in site-a site-b site-c; do
  dir="$out/sites/$site"
  mkdir -p "$dir"
  "$fc" enrol-request --name "$site" --out "$dir/bundle" >&2
  "$fco" pki sign --dir "$out/pki" --request "$dir/bundle/request.pem" --role site \
    --name "$site" --out "$out/pki/signed/$site" >&2
  cp "$out/pki/signed/$site/cert.pem" "$out/pki/signed/$site/ca.pem" "$dir/bundle/"
  cp "$out/data/vocab.json" "$dir/vocab.json"
  cp "$out/data/sites/site-00$i.csv" "$dir/backfill.csv"
  cat > "$dir/site.toml" <<TOML
# $site in the compose federation (every key: client/examples/site.toml). The API listens
# on the container's loopback; publish it with TLS and a token to reach it from outside.
[site]
data_dir = "/var/lib/fedflow-site/data"
vocab = "vocab.json"

[coordinator]
url = "https://coordinator:50051"
identity = "bundle"

[http]
listen = "127.0.0.1:8088"
TOML
  i=$((i + 1))
done
# The containers run as user 65532: give it what it must read (as root; rootless podman
# maps users differently, see its --userns).
if [ "$(id -u)" = 0 ]; then
  chown -R 65532:65532 "$out/sites" "$out/pki/coordinator"
fi
echo "$out"
