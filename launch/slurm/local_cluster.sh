#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, with accounting (slurmdbd + MariaDB), for tests and CI.
#
#   bash launch/slurm/local_cluster.sh start    # install the Debian packages if missing, start the daemons
#   bash launch/slurm/local_cluster.sh status   # what runs, sinfo, sacctmgr
#   bash launch/slurm/local_cluster.sh stop     # cancel jobs, stop the daemons this script started
#   eval "$(bash launch/slurm/local_cluster.sh env)"   # export SLURM_CONF for sbatch/sacct/submitit
#
# Needs root (packages, daemons as root) and no systemd. Everything goes under $IJEPA_SLURM_DIR
# (default /var/tmp/ijepa-slurm): the config ($IJEPA_SLURM_DIR/etc/{slurm,slurmdbd}.conf), MariaDB's
# own datadir, state, logs and pid files. /etc/slurm is never read or written: the daemons and every
# client find the config through SLURM_CONF (`env` prints it), so a system slurm.conf does not matter.
# The preconditions (root, free ports) are checked before anything is installed.
# Daemons: munged, mariadbd (127.0.0.1:$IJEPA_SLURM_DB_PORT and a socket in the state dir),
# slurmdbd (127.0.0.1:6819), slurmctld (6817), slurmd (6818). Requeue delays are short for tests:
# AuthInfo=cred_expire=10 and a 1-2 s scheduler. Safe to run twice: running daemons are kept.
set -euo pipefail

STATE=${IJEPA_SLURM_DIR:-/var/tmp/ijepa-slurm}
DB_PORT=${IJEPA_SLURM_DB_PORT:-3307}
CLUSTER=${IJEPA_SLURM_CLUSTER:-ijepa}
PARTITION=${IJEPA_SLURM_PARTITION:-debug}
NODE=$(hostname -s)
# At least 4 CPUs are declared (slurmd accepts it with config_overrides) so that two 2-task test
# jobs can run at once on a 2-core machine; IJEPA_SLURM_CPUS sets another number.
CPUS=${IJEPA_SLURM_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}
MARK="# written by ijepa-scale launch/slurm/local_cluster.sh"
CONF_DIR=$STATE/etc
# The daemons, this script's own clients and slurmdbd (which reads slurmdbd.conf beside it) use it.
export SLURM_CONF=$CONF_DIR/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

pidfile() {
  case $1 in
    munged) echo /run/munge/munged.pid ;;  # munged runs as user munge and writes its own dirs
    *) echo "$STATE/run/$1.pid" ;;
  esac
}

# A pid counts only while it is alive (not a zombie) and runs the expected program.
running_pid() {
  local file pid
  file=$(pidfile "$1")
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  [ -r "/proc/$pid/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat")" != "Z" ] || return 1
  grep -q "$1" "/proc/$pid/comm" 2>/dev/null || return 1
  echo "$pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "$what did not come up within ${limit}s (logs: $STATE/log)"
    sleep 0.3
  done
}

# TCP ports that something listens on in this network namespace (IPv4 and IPv6), one per line.
listening_ports() {
  local file state addr rest
  for file in /proc/net/tcp /proc/net/tcp6; do
    [ -r "$file" ] || continue
    while read -r _ addr _ state rest; do
      if [ "$state" = 0A ]; then echo $((16#${addr##*:})); fi
    done < <(tail -n +2 "$file")
  done | sort -un
}

# Everything that can refuse is checked here, before any package is installed.
preflight() {
  [ "$(id -u)" -eq 0 ] || die "run as root: it installs packages and starts the daemons as root"
  local busy=() port name listening
  listening=$(listening_ports)
  for port in 6817:slurmctld 6818:slurmd 6819:slurmdbd "$DB_PORT:mariadbd"; do
    name=${port#*:}; port=${port%%:*}
    if grep -qx "$port" <<<"$listening" && ! running_pid "$name" >/dev/null; then busy+=("$port ($name)"); fi
  done
  [ ${#busy[@]} -eq 0 ] || die "TCP port(s) ${busy[*]} already in use by another program; stop it (or set IJEPA_SLURM_DB_PORT for MariaDB)"
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  say "installing ${missing[*]}"
  # Without systemd the packages' postinst scripts would try to start their services (MariaDB
  # on /var/lib/mysql); a policy-rc.d denies that, and is removed again if it was not there.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy && own_policy=1
  fi
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  [ $own_policy -eq 0 ] || rm -f $policy
}

CHANGED=()
write_conf() {  # write_conf PATH MODE  (content on stdin); appends PATH to CHANGED if it changed
  local path=$1 mode=$2 tmp
  tmp=$(mktemp "$path.XXXXXX")
  cat > "$tmp"
  chmod "$mode" "$tmp"
  if [ -e "$path" ] && cmp -s "$tmp" "$path"; then rm -f "$tmp"; else mv "$tmp" "$path"; CHANGED+=("$path"); fi
}

write_configs() {
  local mem
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$STATE"/{etc,run,log,ctld,slurmd,mysql-tmp}
  [ -s "$STATE/db_password" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$STATE/db_password")
  write_conf "$SLURM_CONF" 644 <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2,sched_min_interval=100000
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  write_conf "$CONF_DIR/slurmdbd.conf" 600 <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$STATE/db_password")
StorageLoc=slurm_acct_db
EOF
}

start_munged() {
  running_pid munged >/dev/null && return
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
  [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
  runuser -u munge -- munged
  touch "$STATE/run/munged.ours"  # munged keeps its pid in /run/munge: stop only one this script started
  wait_for 10 munged bash -c "munge -n | unmunge"
}

db() { mariadb --no-defaults --socket="$STATE/mysqld.sock" -uroot "$@"; }

start_mariadb() {
  if ! running_pid mariadbd >/dev/null; then
    if [ ! -d "$STATE/mysql/mysql" ]; then
      mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root --auth-root-authentication-method=socket \
        --skip-test-db > "$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $STATE/log/mariadb-install.log"
    fi
    setsid mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --tmpdir="$STATE/mysql-tmp" \
      --socket="$STATE/mysqld.sock" --pid-file="$(pidfile mariadbd)" --bind-address=127.0.0.1 --port="$DB_PORT" \
      --skip-name-resolve --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
      --log-error="$STATE/log/mariadb.log" < /dev/null > /dev/null 2>&1 &
    wait_for 60 mariadbd db -e "select 1"
  fi
  local pass
  pass=$(cat "$STATE/db_password")
  db -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
         CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
         ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
         GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurm() {
  if ! running_pid slurmdbd >/dev/null; then
    slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster
  fi
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
  if ! running_pid slurmctld >/dev/null; then
    slurmctld
    wait_for 30 slurmctld scontrol ping
  fi
  if ! running_pid slurmd >/dev/null; then
    slurmd
  fi
  wait_for 30 "node $NODE" bash -c "sinfo -h -n $NODE -o %T | grep -Eq '^(idle|mixed|allocated)'"
}

cmd_start() {
  preflight
  install_packages
  write_configs
  if [ ${#CHANGED[@]} -gt 0 ] && running_pid slurmctld >/dev/null; then
    say "config changed (${CHANGED[*]}): restarting the SLURM daemons"
    stop_daemon slurmd; stop_daemon slurmctld; stop_daemon slurmdbd
  fi
  start_munged
  start_mariadb
  start_slurm
  say "up: partition $PARTITION, node $NODE ($CPUS CPUs), cluster $CLUSTER with accounting; state in $STATE"
  say "clients need the config: export SLURM_CONF=$SLURM_CONF  (or: eval \"\$(bash $0 env)\")"
}

stop_daemon() {
  local name=$1 pid comm i
  if [ "$name" = munged ] && [ ! -e "$STATE/run/munged.ours" ]; then return 0; fi
  pid=$(running_pid "$name") || return 0
  comm=$(cat "/proc/$pid/comm")
  kill -TERM "$pid"
  # Wait for the process itself: a daemon may remove its pid file long before it has exited.
  for i in $(seq 1 100); do
    if ! alive "$pid" "$comm"; then
      say "stopped $name ($pid)"
      rm -f "$(pidfile "$name")" "$STATE/run/$name.ours"
      return 0
    fi
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$(pidfile "$name")" "$STATE/run/$name.ours"
  say "killed $name ($pid) after 20 s"
}

alive() {  # alive PID COMM: the process exists, is not a zombie and still runs COMM
  [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ] &&
    [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

cmd_stop() {
  if running_pid slurmctld >/dev/null; then
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs $jobs"
      # shellcheck disable=SC2086
      scancel $jobs || true
      # A task that blocks SIGTERM is killed after KillWait (30 s); stop slurmd only after that.
      local end=$((SECONDS + 45))
      while [ -n "$(squeue -h -o %A 2>/dev/null)" ] && [ $SECONDS -lt $end ]; do sleep 0.5; done
    fi
  fi
  local i
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    stop_daemon "${DAEMONS[$i]}"
  done
}

cmd_status() {
  local name pid rc=0
  for name in "${DAEMONS[@]}"; do
    if pid=$(running_pid "$name"); then echo "$name: running ($pid)"; else echo "$name: stopped"; rc=1; fi
  done
  if [ $rc -eq 0 ]; then
    sinfo
    sacctmgr -n list cluster format=cluster,controlhost,controlport
  fi
  return $rc
}

cmd_env() {
  [ -e "$SLURM_CONF" ] || echo "local_cluster: note: $SLURM_CONF does not exist yet (run: $0 start)" >&2
  echo "export SLURM_CONF=$SLURM_CONF"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
