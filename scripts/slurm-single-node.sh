#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the SLURM tests and for trying
# `zoo generate --executor slurm` by hand: slurmctld, slurmd, slurmdbd (accounting, which
# submitit's job states need) with MariaDB, and munge, all on loopback, as root, without
# systemd or cgroups (Debian 12's slurm-wlm 22.05).
#
#   scripts/slurm-single-node.sh up   [BASE]   install if needed, start, wait until the node is idle
#   scripts/slurm-single-node.sh down [BASE]   stop every daemon it started (by recorded PID)
#   scripts/slurm-single-node.sh status [BASE]
#
# BASE (default $ZOO_SLURM_BASE, else /tmp/zoo-slurm) holds every mutable file. Clients need
#   export SLURM_CONF=$BASE/slurm/slurm.conf      (also written to $BASE/slurm.env)
set -euo pipefail
ACTION=${1:?usage: $0 up|down|status [BASE]}
BASE=${2:-${ZOO_SLURM_BASE:-/tmp/zoo-slurm}}
S=$BASE/slurm; M=$BASE/munge; DB=$BASE/mysql
DBPORT=${ZOO_SLURM_DBPORT:-3307}   # not 3306: a distribution's own MariaDB cannot collide
DAEMONS="slurmd slurmctld slurmdbd mariadbd munged"   # stop order

alive() {  # a recorded daemon that runs (a killed one may linger as a zombie until reaped)
  local state
  [ -f "$BASE/pids.$1" ] || return 1
  state=$(ps -o stat= -p "$(cat "$BASE/pids.$1")" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "${state#Z}" = "$state" ]
}
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  for _ in $(seq $((seconds * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "slurm-single-node: $what did not come up within ${seconds}s (logs: $BASE)" >&2; return 1
}

down() {
  for n in $DAEMONS; do
    f="$BASE/pids.$n"; [ -f "$f" ] || continue
    p=$(cat "$f")
    if kill -0 "$p" 2>/dev/null; then
      kill -TERM "$p"
      for _ in $(seq 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$p" 2>/dev/null && kill -KILL "$p"
    fi
    rm -f "$f"
  done
}

install() {
  command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v munged >/dev/null \
    && command -v mariadbd >/dev/null && return 0
  export DEBIAN_FRONTEND=noninteractive
  local created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # keep the packages' scripts from starting services
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; created=1
  fi
  apt-get install -y -qq --no-install-recommends slurm-wlm munge slurmdbd mariadb-server >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge slurmdbd mariadb-server >/dev/null; }
  [ "$created" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

start_slurmd() {
  cd "$BASE"
  nohup slurmd -D > "$S/log/slurmd.stdout" 2>&1 &
  echo $! > "$BASE/pids.slurmd"
  # responding again: idle, or running (or finishing) jobs it had before
  wait_for 90 "the node" sh -c 'sinfo -h -o %T | grep -qxE "idle|mixed|allocated|completing"'
}

up() {
  if alive munged && alive mariadbd && alive slurmdbd && alive slurmctld; then
    export SLURM_CONF="$S/slurm.conf"
    alive slurmd || start_slurmd   # only the node daemon died (as in a node failure): restart it alone
    echo "export SLURM_CONF=$S/slurm.conf"; return 0
  fi
  down
  install
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 600 /etc/munge/munge.key
  mkdir -p "$BASE" "$M" "$S"/spool/ctld "$S"/spool/d "$S"/log "$S"/run "$DB"
  chmod 755 "$BASE"
  chown munge:munge "$M"; chmod 755 "$M"   # munged's socket folder must be o+x
  chown mysql:mysql "$DB"

  # munged as user munge, in the foreground, backgrounded here so that $! is its PID
  nohup setpriv --reuid=munge --regid=munge --init-groups munged -F --socket="$M/munge.socket.2" \
    --pid-file="$M/munged.pid" --log-file="$M/munged.log" --seed-file="$M/munged.seed" > "$M/munged.stdout" 2>&1 &
  echo $! > "$BASE/pids.munged"
  wait_for 15 munged test -S "$M/munge.socket.2"

  # MariaDB for slurmdbd (accounting: submitit reads job states with sacct)
  [ -d "$DB/data/mysql" ] || mariadb-install-db --no-defaults --user=mysql --datadir="$DB/data" \
    --auth-root-authentication-method=socket --skip-test-db > "$DB/install.log" 2>&1
  nohup mariadbd --no-defaults --user=mysql --datadir="$DB/data" --socket="$DB/mysqld.sock" \
    --pid-file="$DB/mysqld.pid" --bind-address=127.0.0.1 --port="$DBPORT" --log-error="$DB/mysqld.err" \
    --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 > /dev/null 2>&1 &
  echo $! > "$BASE/pids.mariadbd"
  wait_for 30 mariadb mariadb-admin --socket="$DB/mysqld.sock" ping
  mariadb --socket="$DB/mysqld.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

  # the node's description must match `slurmd -C`, or slurmctld drains it
  local host cpus sockets cores threads mem
  host=$(hostname -s)
  read -r cpus sockets cores threads mem < <(slurmd -C | head -1 | sed -E \
    's/.*CPUs=([0-9]+).*SocketsPerBoard=([0-9]+) CoresPerSocket=([0-9]+) ThreadsPerCore=([0-9]+) RealMemory=([0-9]+).*/\1 \2 \3 \4 \5/')
  mem=$(( mem * 85 / 100 ))
  cat > "$S/slurm.conf" <<CONF
ClusterName=zoo
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$M/munge.socket.2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$S/spool/ctld
SlurmdSpoolDir=$S/spool/d
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups here: linuxproc tracking, no task plugin
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
# slurmctld -> slurmdbd does not use AuthInfo: name the socket here too
AccountingStoragePass=$M/munge.socket.2
SelectType=select/cons_tres
# a default memory per CPU, else every job asks for all memory and array tasks run one at a time
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MpiDefault=none
SchedulerType=sched/backfill
# a restarted slurmd brings the node back by itself
ReturnToService=2
SlurmdTimeout=10
# a cancelled job's processes get 5 s between SIGTERM and SIGKILL (default 30)
KillWait=5
MinJobAge=3600
MaxArraySize=1001
MailProg=/bin/true
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  cat > "$S/slurmdbd.conf" <<CONF
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$M/munge.socket.2
LogFile=$S/log/slurmdbd.log
PidFile=$S/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
CONF
  chmod 600 "$S/slurmdbd.conf"
  export SLURM_CONF="$S/slurm.conf"
  echo "export SLURM_CONF=$S/slurm.conf" > "$BASE/slurm.env"

  # slurmdbd -> slurmctld -> slurmd, each as its own statement so that $! is the daemon
  cd "$BASE"
  nohup slurmdbd -D > "$S/log/slurmdbd.stdout" 2>&1 &
  echo $! > "$BASE/pids.slurmdbd"
  wait_for 30 slurmdbd sacctmgr -n list cluster
  nohup slurmctld -D -i > "$S/log/slurmctld.stdout" 2>&1 &
  echo $! > "$BASE/pids.slurmctld"
  wait_for 30 slurmctld sh -c 'scontrol ping | grep -q UP'
  start_slurmd
  echo "export SLURM_CONF=$S/slurm.conf"
}

case "$ACTION" in
  up) up ;;
  down) down ;;
  status) for n in $DAEMONS; do if alive "$n"; then echo "$n up"; else echo "$n down"; fi; done ;;
  *) echo "usage: $0 up|down|status [BASE]" >&2; exit 2 ;;
esac
