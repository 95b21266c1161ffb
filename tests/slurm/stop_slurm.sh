#!/usr/bin/env bash
# Stops the daemons that tests/slurm/setup_slurm.sh started, by the PIDs it recorded in
# $FEMURSR_SLURM_DIR/pids (default /tmp/femursr-slurm), newest first; a PID is signalled only
# while it still runs the program recorded for it. Jobs still queued or running on that
# (private, one-node) cluster are cancelled first, so none outlives slurmd.
# Packages that setup_slurm.sh installed are removed again (FEMURSR_SLURM_KEEP_PACKAGES=1 keeps
# them): with SLURM's commands installed but no controller answering, every `snakemake` start
# waits ~10 s, because snakemake-executor-plugin-slurm asks `scontrol show config` when loaded.
# `--purge` also removes the state directory and the configuration it wrote to /etc/slurm.
set -euo pipefail

STATE=${FEMURSR_SLURM_DIR:-/tmp/femursr-slurm}
PIDS="$STATE/pids"

if [ ! -f "$PIDS" ]; then
    echo "stop_slurm: nothing to stop ($PIDS not found)"
else
    ctld=$(awk '$1 == "slurmctld" {print $2}' "$PIDS")
    if [ -n "$ctld" ] && kill -0 "$ctld" 2>/dev/null; then
        jobs=$(timeout 20 squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            echo "stop_slurm: cancelling jobs $(echo $jobs)"
            timeout 20 scancel $jobs || true
            for _ in $(seq 60); do
                [ -z "$(timeout 20 squeue -h -o %i 2>/dev/null || true)" ] && break
                sleep 0.5
            done
        fi
    fi
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
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop_slurm: $name (PID $pid) did not stop in 30 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        echo "stop_slurm: stopped $name (PID $pid)"
    done
    rm -f "$PIDS"
fi

if [ -f "$STATE/installed_packages" ] && [ -z "${FEMURSR_SLURM_KEEP_PACKAGES:-}" ]; then
    packages=$(cat "$STATE/installed_packages")
    echo "stop_slurm: removing the packages setup_slurm.sh installed: $packages"
    DEBIAN_FRONTEND=noninteractive apt-get remove -y -q $packages >"$STATE/apt-remove.log" 2>&1 ||
        echo "stop_slurm: apt-get remove failed; see $STATE/apt-remove.log"
    rm -f "$STATE/installed_packages"
fi

if [ "${1:-}" = "--purge" ]; then
    rm -rf "$STATE"
    for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf /etc/slurm/slurmdbd.conf; do
        if [ -f "$f" ] && head -1 "$f" | grep -qx "# written by tests/slurm/setup_slurm.sh"; then rm -f "$f"; fi
    done
    echo "stop_slurm: removed $STATE and the configuration it wrote to /etc/slurm"
fi
