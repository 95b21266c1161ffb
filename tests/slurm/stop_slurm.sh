#!/usr/bin/env bash
# Stops the daemons that tests/slurm/setup_slurm.sh started, by the PIDs it recorded in
# $FEMURSR_SLURM_DIR/pids (default /tmp/femursr-slurm), newest first; a PID is signalled only
# while it still runs the program recorded for it. `--purge` also removes the state directory.
set -euo pipefail

STATE=${FEMURSR_SLURM_DIR:-/tmp/femursr-slurm}
PIDS="$STATE/pids"

if [ ! -f "$PIDS" ]; then
    echo "stop_slurm: nothing to stop ($PIDS not found)"
else
    tac "$PIDS" | while read -r name pid; do
        if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
            echo "stop_slurm: $name (PID ${pid:-?}) is not running"
            continue
        fi
        comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
        case "$comm" in
            "$name"*) ;;
            *) echo "stop_slurm: PID $pid runs '$comm', not $name: left alone"; continue ;;
        esac
        kill -TERM "$pid"
        for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop_slurm: $name (PID $pid) did not stop in 30 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        echo "stop_slurm: stopped $name (PID $pid)"
    done
    rm -f "$PIDS"
fi

if [ "${1:-}" = "--purge" ]; then
    rm -rf "$STATE"
    echo "stop_slurm: removed $STATE"
fi
