#!/usr/bin/env bash
# memopt's one entry point for a fresh machine:
#   ./dev.sh demo   set up .venv if needed, then train a small GPT with backend="memopt"
#   ./dev.sh test   set up .venv if needed, then run the test suite on two worker
#                   processes (pytest-xdist, one test file per worker at a time;
#                   MEMOPT_TEST_WORKERS=0 runs it in this process, as plain pytest)
# Set-up installs torch 2.13.0 first unless .venv already has a torch that imports (the
# wheel pip's indexes offer: the CPU one from this machine's wheel directory, the CUDA
# build from plain PyPI on Linux), then memopt with its dev extras, which keep it.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv
STAMP=$VENV/.memopt-installed

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "[dev.sh] creating $VENV with $PYTHON"
        "$PYTHON" -m venv "$VENV"
    fi
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        echo "[dev.sh] installing torch 2.13.0 (a few minutes; nothing is printed meanwhile)"
        "$VENV/bin/pip" install --quiet --upgrade pip
        "$VENV/bin/pip" install --quiet "torch==2.13.0"
    fi
    if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
        echo "[dev.sh] installing memopt (editable) with dev extras"
        "$VENV/bin/pip" install --quiet -e ".[dev]"
        touch "$STAMP"
    fi
}

case "${1:-}" in
    demo)
        setup
        shift
        exec "$VENV/bin/python" examples/demo_gpt.py "$@"
        ;;
    test)
        setup
        shift
        # Most of the suite's time is single-threaded Python (tracing, planning), so two
        # workers on two cores finish it in about 0.7 of one process's time. Whole files
        # go to one worker (--dist loadfile) so module fixtures are built once.
        WORKERS=${MEMOPT_TEST_WORKERS:-2}
        if [ "$WORKERS" = 0 ]; then
            exec "$VENV/bin/python" -m pytest -q "$@"
        fi
        exec "$VENV/bin/python" -m pytest -q -n "$WORKERS" --dist loadfile "$@"
        ;;
    *)
        echo "usage: ./dev.sh demo|test [args...]" >&2
        exit 2
        ;;
esac
