#!/usr/bin/env bash
# Quick start: run the worker in the background as a transient systemd user service.
# Run from the project folder after the README's setup command. Logs: journalctl --user -u mammo-screen
# Stop: systemctl --user stop mammo-screen
# Needs a user session (a real login, not su/sudo -u); the worker stops at logout unless
# `loginctl enable-linger USER`. The README shows this exact command (a test keeps them equal);
# without systemd, see deploy/supervisord.conf.
set -euo pipefail
cd "$(dirname "$0")/.."
exec systemd-run --user --unit mammo-screen --working-directory="$PWD" \
    -p Restart=on-failure -p RestartSec=10 -p NoNewPrivileges=yes -p PrivateTmp=yes \
    -p KillSignal=SIGTERM -p TimeoutStopSec=120 \
    "$PWD/.venv/bin/screen" --config "$PWD/config.toml" watch
