# Shared settings for the peer scripts (sourced, not run).
PEERS_DIR="${PEERS_DIR:-$HOME/.cache/agora/peers}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
AGORA="${AGORA:-$REPO_ROOT/.venv/bin/agora}"
MODEL_NAME="SmolLM2-135M-Instruct"
mkdir -p "$PEERS_DIR"
