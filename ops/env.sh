# Sourced by the ops/ scripts: puts the project's virtual environment (with PyTorch 2.11.0, whose
# libtorch tch binds) first on PATH and tells torch-sys to use it.
UAMT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export UAMT_ROOT
export UAMT_VENV="${UAMT_VENV:-$UAMT_ROOT/.venv}"
export PATH="$UAMT_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# The Python that the golden tests run as their oracle.
export UAMT_PYTHON="$UAMT_VENV/bin/python3"
