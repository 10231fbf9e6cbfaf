#!/bin/sh
# What the browser tests (tests/test_leaderboard_browser.py) need: Debian's headless Chromium and its driver,
# plus selenium (in the project's test extra). With CI=true those tests fail, not skip, when the browser is missing.
set -eu
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi
chromium --version
chromedriver --version
python -c "import selenium; print('selenium', selenium.__version__)"
