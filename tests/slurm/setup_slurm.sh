#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/test_slurm.py and CI (issue 8).
#
# Installs Debian's SLURM (slurmctld, slurmd, slurm-client, slurmdbd), munge and MariaDB when
# they are missing, writes the configuration to /etc/slurm (slurm.conf, gres.conf,
# slurmdbd.conf: the place every SLURM command looks, including the `srun` inside a job, whose
# environment the executor plugin clears of SLURM_* variables such as SLURM_CONF) and starts
# munged, mariadbd, slurmdbd, slurmctld and slurmd with their state under $FEMURSR_SLURM_DIR
# (default /tmp/femursr-slurm): their own munge key and socket, database and ports, so a munge
# or database already on the machine is not touched. A slurm.conf in /etc/slurm that this
# script did not write is never overwritten (it stops with a message instead).
# The node stands in for an H100 node: 16 CPUs, 64 GB and one GRES gpu:h100 backed by
# /dev/null (`SlurmdParameters=config_overrides`), in two partitions: `batch` (CPU, default) and
# `gpu`. Jobs run on the real cores; a "GPU" job gets CUDA_VISIBLE_DEVICES but no GPU.
# Accounting goes through slurmdbd into MariaDB, so `sacct` shows finished jobs (the executor
# plugin polls sacct whenever it exists) and the account `femursr` can be checked.
#
# Idempotent: a second call with everything running only prints the state. PIDs of what it
# started go to $FEMURSR_SLURM_DIR/pids; tests/slurm/stop_slurm.sh stops exactly those, and
# removes the packages again if this script installed them (see there why).
# Needs root (apt-get, daemons, /etc/slurm). About a minute with the installation, seconds after.
set -euo pipefail

STATE=${FEMURSR_SLURM_DIR:-/tmp/femursr-slurm}
PORT_BASE=${FEMURSR_SLURM_PORT_BASE:-16800}
DB_PORT=$((PORT_BASE + 6))
CTLD_PORT=$((PORT_BASE + 17))
SLURMD_PORT=$((PORT_BASE + 18))
DBD_PORT=$((PORT_BASE + 19))
CLUSTER=femursr
ACCOUNT=femursr
NODE_CPUS=16
NODE_MEM_MB=64000
HERE=$(cd "$(dirname "$0")" && pwd)

say() { echo "setup_slurm: $*"; }
die() { echo "setup_slurm: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages with apt-get and starts daemons)"

# ------------------------------------------------------------------------------ packages
PACKAGES="slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
missing=""
for exe in slurmctld slurmd sbatch sacct slurmdbd munged mariadbd mariadb-install-db; do
    command -v "$exe" >/dev/null 2>&1 || [ -x "/usr/sbin/$exe" ] || missing="$missing $exe"
done
if [ -n "$missing" ]; then
    say "installing $PACKAGES (missing:$missing)"
    mkdir -p "$STATE"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends $PACKAGES >"$STATE/apt-install.log" 2>&1 || {
        apt-get update -q >>"$STATE/apt-install.log" 2>&1
        apt-get install -y -q --no-install-recommends $PACKAGES >>"$STATE/apt-install.log" 2>&1 ||
            die "apt-get install $PACKAGES failed; see $STATE/apt-install.log"
    }
    echo "$PACKAGES" >"$STATE/installed_packages"  # stop_slurm.sh removes them again
    say "installed: $(dpkg-query -W -f='${Package} ${Version}; ' slurmctld slurmdbd munge mariadb-server)"
else
    say "packages already installed: $(dpkg-query -W -f='${Package} ${Version}; ' slurmctld slurmdbd munge mariadb-server 2>/dev/null)"
fi
export PATH="$PATH:/usr/sbin:/sbin"

ETC=/etc/slurm
MARK="# written by tests/slurm/setup_slurm.sh"
unset SLURM_CONF
MUNGE_SOCKET="$STATE/munge/munge.socket.2"
DB_SOCKET="$STATE/mysql/mysqld.sock"
PIDS="$STATE/pids"

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# ------------------------------------------------------------------------------ already up?
if [ -f "$PIDS" ]; then
    all=1
    while read -r name pid; do alive "$pid" || all=0; done <"$PIDS"
    if [ "$all" -eq 1 ] && [ "$(wc -l <"$PIDS")" -eq 5 ] && sinfo -h >/dev/null 2>&1; then
        say "already running ($(tr '\n' ' ' <"$PIDS"))"
        sinfo
        exit 0
    fi
    say "a previous start is incomplete; stopping what is left of it"
    FEMURSR_SLURM_KEEP_PACKAGES=1 "$HERE/stop_slurm.sh"
fi

for port in $DB_PORT $CTLD_PORT $SLURMD_PORT $DBD_PORT; do
    if ss -ltn "( sport = :$port )" 2>/dev/null | grep -q ":$port"; then
        die "port $port is in use; set FEMURSR_SLURM_PORT_BASE to another base (now $PORT_BASE)"
    fi
done

if [ -f "$ETC/slurm.conf" ] && ! head -1 "$ETC/slurm.conf" | grep -qx "$MARK"; then
    die "$ETC/slurm.conf exists and was not written by this script (a real SLURM?); not touching it"
fi
mkdir -p "$ETC" "$STATE"/{log,run,ctld,spool,munge,mysql}
: >"$PIDS"
record() {  # record NAME PIDFILE: the daemon's PID, once it has written it
    local pid
    pid=$(pid_from "$2") || exit 1
    echo "$1 $pid" >>"$PIDS"
    say "started $1 (PID $pid)"
}

# wait_for SECONDS WHAT COMMAND...: run COMMAND until it succeeds
wait_for() {
    local end=$((SECONDS + $1)) what=$2
    shift 2
    while [ "$SECONDS" -lt "$end" ]; do
        if timeout 10 "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    die "$what did not come up in time; logs in $STATE/log"
}

pid_from() {  # pid_from FILE: the PID written by a daemon, once it is there
    for _ in $(seq 120); do
        if [ -s "$1" ]; then cat "$1"; return 0; fi
        sleep 0.25
    done
    die "no PID file $1 after 30 s; logs in $STATE/log"
}

# ------------------------------------------------------------------------------ munge
chown munge:munge "$STATE/munge"
chmod 0755 "$STATE/munge"  # munged: the socket dir must be searchable by all
if [ ! -s "$STATE/munge/munge.key" ]; then
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
fi
chown munge:munge "$STATE/munge/munge.key"
chmod 0600 "$STATE/munge/munge.key"
rm -f "$STATE/munge/munged.pid" "$MUNGE_SOCKET"
runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
    --seed-file="$STATE/munge/munged.seed"
record munged "$STATE/munge/munged.pid"
wait_for 15 munged sh -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"

# ------------------------------------------------------------------------------ MariaDB
chown mysql:mysql "$STATE/mysql"
if [ ! -d "$STATE/mysql/data/mysql" ]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql/data" \
        --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 ||
        die "mariadb-install-db failed; see $STATE/log/mariadb-install.log"
fi
rm -f "$STATE/mysql/mariadbd.pid"
setsid mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql/data" --socket="$DB_SOCKET" \
    --pid-file="$STATE/mysql/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --log-error="$STATE/mysql/mariadbd.log" --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
record mariadbd "$STATE/mysql/mariadbd.pid"
wait_for 60 mariadbd mariadb-admin --no-defaults --socket="$DB_SOCKET" ping
DB_PASS=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
mariadb --no-defaults --socket="$DB_SOCKET" -u root <<SQL
CREATE OR REPLACE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE OR REPLACE USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# ------------------------------------------------------------------------------ configuration
HOST=$(hostname -s)
cat >"$ETC/slurm.conf" <<CONF
$MARK
# one node that stands in for an H100 node; state in $STATE
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for connections to slurmdbd (sacct, sacctmgr) this names the munge socket
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageTRES=gres/gpu,gres/gpu:h100
# long enough for squeue-based status queries too
MinJobAge=600
# sacct shows the comment, which the executor plugin sets to the rule and its wildcards
AccountingStoreFlags=job_comment
ReturnToService=2
# jobs are not requeued unless they ask (sbatch --requeue: the profile's slurm-requeue)
JobRequeue=0
KillWait=10
# the node claims more CPUs, memory and a GPU than this machine has
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB Gres=gpu:h100:1 State=UNKNOWN
PartitionName=batch Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
CONF
cat >"$ETC/gres.conf" <<CONF
$MARK
# the "H100": a GRES gpu of type h100 backed by /dev/null
AutoDetect=off
NodeName=$HOST Name=gpu Type=h100 File=/dev/null
CONF
cat >"$ETC/slurmdbd.conf" <<CONF
$MARK
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
chmod 0600 "$ETC/slurmdbd.conf"

# ------------------------------------------------------------------------------ SLURM daemons
rm -f "$STATE"/run/*.pid
slurmdbd
record slurmdbd "$STATE/run/slurmdbd.pid"
wait_for 60 slurmdbd sacctmgr -n list cluster
sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
sacctmgr -i add account "$ACCOUNT" Description="femursr tests" Organization=femursr >/dev/null 2>&1 || true
sacctmgr -i add user root Account="$ACCOUNT" >/dev/null 2>&1 || true

slurmctld
record slurmctld "$STATE/run/slurmctld.pid"
wait_for 60 slurmctld scontrol ping

slurmd
record slurmd "$STATE/run/slurmd.pid"
wait_for 60 "node $HOST (idle)" sh -c "sinfo -h -n '$HOST' -o %T | grep -qx idle"

say "cluster $CLUSTER is up: configuration in $ETC, state in $STATE, PIDs in $PIDS"
sinfo
sacctmgr -n -P list association format=cluster,account,user | sed 's/^/setup_slurm: association /'
