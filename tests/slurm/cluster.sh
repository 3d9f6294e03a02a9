#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests/slurm.
#
#   tests/slurm/cluster.sh install   apt-get slurm-wlm, munge, slurmdbd, mariadb (root)
#   tests/slurm/cluster.sh start     write the config, start the daemons, wait for the node
#   tests/slurm/cluster.sh stop      stop the daemons started here (by pid file)
#   tests/slurm/cluster.sh status    daemons, sinfo, the config in use
#
# Debian 12 without systemd: every daemon is started by hand, with its pid
# file, log and spool under one state directory ($MEDTX_SLURM_DIR, default
# /tmp/medtx-slurm). Accounting is on (slurmdbd + a private MariaDB), because
# the Snakemake SLURM executor checks job status with `sacct` by default.
#
# Environment:
#   MEDTX_SLURM_DIR      state directory                 [/tmp/medtx-slurm]
#   MEDTX_SLURM_GPUS     fake GPUs (gres gpu, /dev/null clones made with mknod) [0]
#   MEDTX_SLURM_DB_PORT  port of the private MariaDB on 127.0.0.1  [3307]
#   MEDTX_SLURM_MIN_JOB_AGE  seconds slurmctld keeps finished jobs (squeue checks) [600]
#
# Clients (sbatch, sacct, snakemake) find the config through /etc/slurm/slurm.conf,
# a symlink made here unless that file already exists and is not ours; otherwise
# export SLURM_CONF=$MEDTX_SLURM_DIR/etc/slurm.conf.
# `start` twice is fine; a changed config (e.g. MEDTX_SLURM_GPUS) restarts the
# SLURM daemons and resumes a drained node.
set -euo pipefail

STATE=${MEDTX_SLURM_DIR:-/tmp/medtx-slurm}
GPUS=${MEDTX_SLURM_GPUS:-0}
DB_PORT=${MEDTX_SLURM_DB_PORT:-3307}
MIN_JOB_AGE=${MEDTX_SLURM_MIN_JOB_AGE:-600}
CLUSTER=medtx
PARTITION=debug
ACCOUNT=medtx
DB_PASS=medtx-slurm-test   # a private, loopback-only test database
NODE=$(hostname -s)
ETC=$STATE/etc
RUN=$STATE/run
LOG=$STATE/log
MUNGE=$STATE/munge
export SLURM_CONF=$ETC/slurm.conf

say() { echo "cluster.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() { # alive PIDFILE: the process named in the pid file runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND (10 s cap per try)
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    while ((SECONDS < deadline)); do
        if declare -F "$1" >/dev/null; then
            if "$@" >/dev/null 2>&1; then return 0; fi
        elif timeout 10 "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    die "timed out waiting for $what"
}

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (installs packages, starts daemons)"; }

# --- install ---------------------------------------------------------------

cmd_install() {
    need_root
    local pkgs=(slurm-wlm slurmdbd munge mariadb-server mariadb-client)
    local status
    status=$(dpkg-query -W -f='${db:Status-Status}\n' "${pkgs[@]}" 2>/dev/null || true)
    if [[ $(grep -cx installed <<<"$status") != "${#pkgs[@]}" ]]; then
        say "installing ${pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        # Keep the packages' init scripts from starting daemons: we start our own.
        local policy=/usr/sbin/policy-rc.d made_policy=0
        if [[ ! -e $policy ]]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
        fi
        local log=${TMPDIR:-/tmp}/medtx-slurm-apt.log ok=1
        if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$log" 2>&1; then
            say "apt-get install failed; running apt-get update and trying once more"
            { apt-get update -q && apt-get install -y -q --no-install-recommends "${pkgs[@]}"; } >>"$log" 2>&1 || ok=0
        fi
        if [[ $made_policy == 1 ]]; then rm -f "$policy"; fi
        if [[ $ok == 0 ]]; then
            tail -20 "$log" >&2
            die "apt-get install ${pkgs[*]} failed (log: $log)"
        fi
    fi
    say "installed: $(dpkg-query -W -f='${Package} ${Version}\n' slurm-wlm slurmdbd munge mariadb-server | paste -sd,)"
}

# --- config ----------------------------------------------------------------

node_line() {
    local cpus mem_total real topo
    cpus=$(nproc)
    mem_total=$(free -m | awk '/^Mem:/ {print $2}')
    real=$((mem_total * 95 / 100))          # a bit below the total: slurmd refuses more
    # sockets/cores/threads as slurmd sees them, so the node is not drained
    # for a topology mismatch; CPUs from nproc.
    topo=$(slurmd -C 2>/dev/null | head -1 | grep -o 'SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' \
        | sed 's/SocketsPerBoard/Sockets/' || true)
    local gres=""
    if ((GPUS > 0)); then gres=" Gres=gpu:$GPUS"; fi
    echo "NodeName=$NODE CPUs=$cpus ${topo:+$topo }RealMemory=$real$gres State=UNKNOWN"
}

write_configs() { # into $1
    local dir=$1 grestypes="# no GPUs (MEDTX_SLURM_GPUS=0)"
    if ((GPUS > 0)); then grestypes="GresTypes=gpu"; fi
    mkdir -p "$dir"
    cat >"$dir/slurm.conf" <<EOF
# Written by medtx tests/slurm/cluster.sh: a one-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here (no systemd): plain process tracking, no task containment.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
# Finished jobs stay visible to squeue this long (squeue status checks need
# at least 3x the executor's first status delay).
MinJobAge=$MIN_JOB_AGE
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
AccountingStoreFlags=job_comment
AccountingStorageTRES=gres/gpu
$grestypes
$(node_line)
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$dir/slurmdbd.conf" <<EOF
# Written by medtx tests/slurm/cluster.sh.
AuthType=auth/munge
DbdHost=$NODE
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$dir/slurmdbd.conf"
    : >"$dir/gres.conf"
    if ((GPUS > 0)); then
        echo "NodeName=$NODE Name=gpu File=$STATE/dev/gpu[0-$((GPUS - 1))]" >"$dir/gres.conf"
    fi
    : >"$dir/cgroup.conf"
}

install_configs() { # prints the names of the config files that changed
    local new=$STATE/etc.new changed=""
    rm -rf "$new"
    write_configs "$new"
    mkdir -p "$ETC"
    for f in slurm.conf slurmdbd.conf gres.conf cgroup.conf; do
        if ! cmp -s "$new/$f" "$ETC/$f"; then
            cp -p "$new/$f" "$ETC/$f"
            changed+=" $f"
        fi
    done
    rm -rf "$new"
    # Clients read /etc/slurm/slurm.conf unless SLURM_CONF is set.
    mkdir -p /etc/slurm
    local link=/etc/slurm/slurm.conf
    if [[ -L $link || ! -e $link ]]; then
        ln -sfn "$ETC/slurm.conf" "$link"
    elif ! grep -q "medtx tests/slurm/cluster.sh" "$link"; then
        say "warning: $link exists and is not ours; clients need SLURM_CONF=$ETC/slurm.conf"
    fi
    echo "$changed"
}

make_fake_gpus() {
    mkdir -p "$STATE/dev"
    local i
    for ((i = 0; i < GPUS; i++)); do
        # gres.conf File= must be a character device: a /dev/null clone.
        [[ -c $STATE/dev/gpu$i ]] || mknod "$STATE/dev/gpu$i" c 1 3
    done
}

# --- daemons ---------------------------------------------------------------

start_munge() {
    # The default socket (/run/munge/munge.socket.2): every SLURM client and
    # daemon finds it without AuthInfo. A munged already answering there (a
    # system one) is used as it is.
    if [[ ! -s $MUNGE/munged.pid ]] && munge -n >/dev/null 2>&1; then
        say "using the munged already running on /run/munge"
        return 0
    fi
    mkdir -p "$MUNGE" /run/munge
    if [[ ! -s $MUNGE/munge.key ]]; then
        mungekey --create --keyfile="$MUNGE/munge.key" 2>/dev/null \
            || dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
    fi
    chown -R munge:munge "$MUNGE" /run/munge
    chmod 755 "$MUNGE" /run/munge
    chmod 600 "$MUNGE/munge.key"
    if ! alive "$MUNGE/munged.pid"; then
        say "starting munged"
        runuser -u munge -- munged --key-file="$MUNGE/munge.key" --pid-file="$MUNGE/munged.pid" \
            --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munged.seed" --num-threads=4
    fi
    wait_for 20 "munged (see $MUNGE/munged.log)" munge -n
}

mysql_root() { timeout 20 mariadb --no-defaults --socket="$RUN/mysqld.sock" -uroot "$@"; }

start_mariadb() {
    local data=$STATE/mysql
    if [[ ! -d $data/mysql ]]; then
        say "initialising the accounting database in $data"
        mkdir -p "$data"
        chown mysql:mysql "$data"
        mariadb-install-db --no-defaults --user=mysql --datadir="$data" \
            --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
            || { tail -20 "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    fi
    touch "$LOG/mariadb.log"
    chown mysql:mysql "$RUN" "$LOG/mariadb.log"   # socket, pid file, log
    if ! alive "$RUN/mysqld.pid"; then
        say "starting mariadbd on 127.0.0.1:$DB_PORT"
        setsid mariadbd --no-defaults --user=mysql --datadir="$data" \
            --socket="$RUN/mysqld.sock" --pid-file="$RUN/mysqld.pid" \
            --port="$DB_PORT" --bind-address=127.0.0.1 --log-error="$LOG/mariadb.log" \
            --innodb-buffer-pool-size=128M --innodb-log-file-size=64M \
            --innodb-lock-wait-timeout=900 --max-allowed-packet=16M \
            </dev/null >/dev/null 2>&1 &
    fi
    wait_for 60 "mariadbd (see $LOG/mariadb.log)" mysql_root -e "SELECT 1"
    mysql_root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_daemon() { # start_daemon NAME PIDFILE: NAME daemonises and writes PIDFILE
    local name=$1 pidfile=$2
    if alive "$pidfile"; then return 0; fi
    say "starting $name"
    "$name" >>"$LOG/$name.out" 2>&1 || die "$name did not start; see $LOG/$name.log and $LOG/$name.out"
    wait_for 20 "$name pid file" alive "$pidfile"
}

stop_pidfile() { # stop_pidfile NAME PIDFILE
    local name=$1 pidfile=$2 pid i
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    say "stopping $name (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 60; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name did not stop in 30 s; killing it"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1; }

node_idle() { [[ $(node_state) == idle* || $(node_state) == mixed* || $(node_state) == allocated* ]]; }

sacctmgr_ok() { timeout 10 sacctmgr -n list cluster format=cluster >/dev/null 2>&1; }

register_accounting() {
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if ! sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT"; then
        sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="medtx tests" organization=medtx >/dev/null
    fi
    if ! sacctmgr -n -P list assoc account="$ACCOUNT" user=root format=user | grep -qx root; then
        sacctmgr -i add user root account="$ACCOUNT" >/dev/null
    fi
}

cmd_start() {
    need_root
    command -v slurmctld >/dev/null || die "SLURM is not installed; run '$0 install' first"
    mkdir -p "$STATE" "$RUN" "$LOG" "$STATE/spool/slurmctld" "$STATE/spool/slurmd"
    chmod 755 "$STATE" "$RUN" "$LOG"
    if ((GPUS > 0)); then make_fake_gpus; fi
    local changed
    changed=$(install_configs)
    # Node, gres and accounting settings are read at start only: restart.
    if [[ $changed =~ (slurm|gres|cgroup)\.conf ]] && { alive "$RUN/slurmctld.pid" || alive "$RUN/slurmd.pid"; }; then
        say "changed:$changed; restarting slurmctld and slurmd"
        stop_pidfile slurmd "$RUN/slurmd.pid"
        stop_pidfile slurmctld "$RUN/slurmctld.pid"
    fi
    if [[ $changed == *slurmdbd.conf* ]] && alive "$RUN/slurmdbd.pid"; then
        stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
    fi
    start_munge
    start_mariadb
    start_daemon slurmdbd "$RUN/slurmdbd.pid"
    wait_for 60 "slurmdbd to answer sacctmgr (see $LOG/slurmdbd.log)" sacctmgr_ok
    register_accounting
    start_daemon slurmctld "$RUN/slurmctld.pid"
    wait_for 30 "slurmctld to answer (see $LOG/slurmctld.log)" scontrol ping
    start_daemon slurmd "$RUN/slurmd.pid"
    local i state
    for ((i = 0; i < 120; i++)); do
        state=$(node_state)
        case $state in
            idle* | mixed* | allocated*) break ;;
            drain* | down* | fail*)
                say "node $NODE is $state ($(sinfo -h -n "$NODE" -o %E)); resuming"
                scontrol update nodename="$NODE" state=resume || true ;;
        esac
        sleep 1
    done
    node_idle || die "node $NODE is '${state:-unknown}', not idle (see $LOG/slurmd.log, $LOG/slurmctld.log)"
    say "cluster $CLUSTER up: node $NODE $(node_state), partition $PARTITION, $GPUS fake GPU(s), state in $STATE"
}

cmd_stop() {
    # By pid file only: nothing this script did not start.
    stop_pidfile slurmd "$RUN/slurmd.pid"
    stop_pidfile slurmctld "$RUN/slurmctld.pid"
    stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
    stop_pidfile mariadbd "$RUN/mysqld.pid"
    stop_pidfile munged "$MUNGE/munged.pid"
    say "stopped (state kept in $STATE)"
}

cmd_status() {
    local rc=0 d
    for d in "munged:$MUNGE/munged.pid" "mariadbd:$RUN/mysqld.pid" "slurmdbd:$RUN/slurmdbd.pid" \
        "slurmctld:$RUN/slurmctld.pid" "slurmd:$RUN/slurmd.pid"; do
        if alive "${d#*:}"; then
            echo "${d%%:*}: running (pid $(cat "${d#*:}"))"
        else
            echo "${d%%:*}: stopped"
            rc=1
        fi
    done
    echo "SLURM_CONF=$SLURM_CONF"
    if [[ $rc == 0 ]]; then
        sinfo -N -o "%N %P %T %c %m %G" || rc=1
    fi
    return $rc
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
