# Shared settings for scripts/: one cache dir for build output and test artefacts.
# Sourced, not run.
export KAIROS_CACHE="${KAIROS_CACHE:-/var/cache/kairos-rs}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$KAIROS_CACHE/target}"
mkdir -p "$KAIROS_CACHE"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export REPO
