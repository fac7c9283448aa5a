#!/usr/bin/env bash
# Debian packages FlexMix-mini is built from (flexmoe_jax/data/sources.py). Needs root (or sudo).
# The math domain needs no package: its generator is pip-installed into an isolated directory.
set -euo pipefail
PKGS=(
  libpython3.11-stdlib   # code: the Python 3.11 standard library sources
  bible-kjv bible-kjv-text  # literature: the King James Bible (program + text)
  fortunes fortunes-min  # humor: BSD fortune cookies
  python3.11-doc         # techdocs: Python 3.11 documentation (reST sources)
  dict-gcide             # public: GNU Collaborative International Dictionary of English
  wordnet-base           # public: WordNet 3.0
  dict-foldoc            # public: Free On-line Dictionary of Computing
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "FlexMix-mini sources: all installed"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "FlexMix-mini sources: installed ${missing[*]}"
