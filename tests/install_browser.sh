#!/usr/bin/env bash
# Debian's Chromium for tests/test_dashboard_browser.py, installed when missing and possible (root, apt).
# Never fails the test run: without a browser that test is skipped and says why.
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the dashboard's browser test (once per machine)"
  # bounded: without a mirror this gives up within ~6 minutes and the browser test is skipped
  timeout 180 apt-get install -y -q chromium >/tmp/kvserve-chromium-install.log 2>&1 \
    || (timeout 60 apt-get update -q >>/tmp/kvserve-chromium-install.log 2>&1 \
        && timeout 180 apt-get install -y -q chromium >>/tmp/kvserve-chromium-install.log 2>&1) \
    || echo "could not install chromium (see /tmp/kvserve-chromium-install.log): the browser test will be skipped"
fi
exit 0
