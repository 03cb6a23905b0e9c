#!/usr/bin/env bash
# A local SLURM cluster with accounting (slurmdbd + MariaDB) on this one machine, for tests and CI.
#
#   bash launch/slurm/local_cluster.sh start [--nodes N]  # install the Debian packages if missing, start
#   bash launch/slurm/local_cluster.sh status   # what runs, sinfo -N, sacctmgr, the node namespaces
#   bash launch/slurm/local_cluster.sh stop     # cancel jobs, stop the daemons, remove the namespaces
#   eval "$(bash launch/slurm/local_cluster.sh env)"   # export SLURM_CONF for sbatch/sacct/submitit
#
# Needs root (packages, daemons as root) and no systemd. Everything goes under $IJEPA_SLURM_DIR
# (default /var/tmp/ijepa-slurm): the config ($IJEPA_SLURM_DIR/etc/{slurm,slurmdbd}.conf), MariaDB's
# own datadir, state, logs and pid files. /etc/slurm is never read or written: the daemons and every
# client find the config through SLURM_CONF (`env` prints it), so a system slurm.conf does not matter.
# The preconditions (root, free ports, namespaces for --nodes > 1) are checked before anything is
# installed. Daemons: munged, mariadbd (127.0.0.1:$IJEPA_SLURM_DB_PORT and a socket in the state dir),
# slurmdbd (6819), slurmctld (6817), slurmd (6818). Requeue delays are short for tests:
# AuthInfo=cred_expire=10 and a 1-2 s scheduler. Safe to run twice: running daemons are kept.
#
# --nodes 1 (default): one node named after this host, slurmd on 127.0.0.1 beside the controller.
# --nodes N (2..50): N nodes ijepa-n1..N, each its own host: its slurmd, and so every job step it
# starts, runs in its own network and UTS namespace (netns ijepa-nK, host name ijepa-nK, interface
# ijepa0 with address 10.77.0.(10+K)/24). The namespaces hang off a bridge ijepa-br0 (10.77.0.1) in
# the root namespace, where slurmctld, slurmdbd, MariaDB and munged stay (munge's socket is a file,
# shared by all). The names go into /etc/hosts (lines tagged "ijepa-scale local_cluster.sh"), so
# MASTER_ADDR=ijepa-n1 resolves everywhere. No route leads out of the subnet. In each node namespace
# ephemeral ports are 60001-65535, so they never take the MASTER_PORT (20000-60000) of a job.
# `stop` removes what `start` made, from its record in $IJEPA_SLURM_DIR/run/net: namespaces (after
# ending the processes left in them, by pid), links, bridge and hosts lines.
# IJEPA_SLURM_SUBNET (default 10.77.0) changes the /24; IJEPA_SLURM_CPUS the CPUs declared per node.
set -euo pipefail

STATE=${IJEPA_SLURM_DIR:-/var/tmp/ijepa-slurm}
DB_PORT=${IJEPA_SLURM_DB_PORT:-3307}
CLUSTER=${IJEPA_SLURM_CLUSTER:-ijepa}
PARTITION=${IJEPA_SLURM_PARTITION:-debug}
HOST=$(hostname -s)
# At least 4 CPUs are declared per node (slurmd accepts it with config_overrides) so that two 2-task
# test jobs can run at once on a 2-core machine; IJEPA_SLURM_CPUS sets another number.
CPUS=${IJEPA_SLURM_CPUS:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}
MARK="# written by ijepa-scale launch/slurm/local_cluster.sh"
CONF_DIR=$STATE/etc
# The daemons, this script's own clients and slurmdbd (which reads slurmdbd.conf beside it) use it.
export SLURM_CONF=$CONF_DIR/slurm.conf
SUBNET=${IJEPA_SLURM_SUBNET:-10.77.0}
CTL_ADDR=$SUBNET.1
BRIDGE=ijepa-br0
NODE_PREFIX=ijepa-n
IFNAME=ijepa0                       # the node's interface inside its namespace: the same on every node
NODE_PORTS="60001 65535"            # ephemeral ports inside a node namespace
NET_RECORD=$STATE/run/net           # what start made: "netns NAME", "link NAME", "bridge NAME", "hosts"
SLURMDS=$STATE/run/slurmds          # the slurmd daemons of the running layout: slurmd or slurmd@NODE
HOSTS_TAG="# ijepa-scale local_cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
NODES=1

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

node_name() { echo "$NODE_PREFIX$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }

pidfile() {
  case $1 in
    munged) echo /run/munge/munged.pid ;;  # munged runs as user munge and writes its own dirs
    slurmd@*) echo "$STATE/run/slurmd-${1#slurmd@}.pid" ;;
    *) echo "$STATE/run/$1.pid" ;;
  esac
}

alive() {  # alive PID COMM: the process exists, is not a zombie and still runs COMM
  [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ] &&
    [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

# A pid counts only while it is alive (not a zombie) and runs the expected program.
running_pid() {
  local file pid
  file=$(pidfile "$1")
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  alive "$pid" "${1%@*}" || return 1
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

recorded() { [ -s "$NET_RECORD" ] && grep -qx "$1 $2" "$NET_RECORD"; }
record() { recorded "$1" "$2" || echo "$1 $2" >> "$NET_RECORD"; }

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
  local busy=() port name listening i
  listening=$(listening_ports)
  for port in 6817:slurmctld 6818:slurmd 6819:slurmdbd "$DB_PORT:mariadbd"; do
    name=${port#*:}; port=${port%%:*}
    # With --nodes > 1 the slurmds listen inside their namespaces: 6818 here does not matter.
    [ "$name" = slurmd ] && [ "$NODES" -gt 1 ] && continue
    if grep -qx "$port" <<<"$listening" && ! running_pid "$name" >/dev/null; then busy+=("$port ($name)"); fi
  done
  [ ${#busy[@]} -eq 0 ] ||
    die "TCP port(s) ${busy[*]} already in use by another program; stop it (or set IJEPA_SLURM_DB_PORT for MariaDB)"
  [ "$NODES" -gt 1 ] || return 0
  local why probe="ip link add probe0 type veth peer name probe1 && ip link add probe2 type bridge"
  if ! why=$(unshare --net --uts true 2>&1); then
    die "--nodes $NODES needs network and UTS namespaces, which this machine refuses" \
        "(unshare --net --uts: ${why//$'\n'/ }); --nodes 1 works without them"
  fi
  if command -v ip >/dev/null; then
    if ! why=$(unshare --net --uts sh -c "$probe" 2>&1); then
      die "--nodes $NODES needs veth pairs and a bridge, which this machine refuses (${why//$'\n'/ });" \
          "--nodes 1 works without them"
    fi
    if ip link show "$BRIDGE" >/dev/null 2>&1 && ! recorded bridge "$BRIDGE"; then
      die "a link $BRIDGE exists that this script did not make; remove it (ip link del $BRIDGE) to use --nodes"
    fi
    for i in $(seq 1 "$NODES"); do
      name=$(node_name "$i")
      if [ -e "/run/netns/$name" ] && ! recorded netns "$name"; then
        die "a network namespace $name exists that this script did not make; remove it (ip netns del $name)"
      fi
    done
    local taken
    taken=$(ip -4 -o addr show |
            awk -v net="$SUBNET." -v br="$BRIDGE" 'index($4, net) == 1 && $2 != br {print $2 " " $4}')
    [ -z "$taken" ] || die "subnet $SUBNET.0/24 is in use here ($taken): set IJEPA_SLURM_SUBNET to a free one"
  fi
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

node_lines() {  # the NodeName and PartitionName lines of the layout
  local mem=$1 i names=()
  if [ "$NODES" -eq 1 ]; then
    echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN"
    names=("$HOST")
  else
    for i in $(seq 1 "$NODES"); do
      echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$CPUS RealMemory=$((mem / NODES)) State=UNKNOWN"
      names+=("$(node_name "$i")")
    done
  fi
  echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP" \
       "OverSubscribe=NO"
}

write_configs() {
  local mem ctl=127.0.0.1
  [ "$NODES" -eq 1 ] || ctl=$CTL_ADDR  # the address every node namespace reaches the controller at
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$STATE"/{etc,run,log,ctld,slurmd,mysql-tmp}
  [ -s "$STATE/db_password" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$STATE/db_password")
  # %n: each slurmd (one per node, all reading this file) gets its own spool dir, pid and log file.
  write_conf "$SLURM_CONF" 644 <<EOF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=$HOST($ctl)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd$([ "$NODES" -eq 1 ] || echo "-%n").pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd$([ "$NODES" -eq 1 ] || echo "-%n").log
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
AccountingStorageHost=$ctl
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$(node_lines "$mem")
EOF
  write_conf "$CONF_DIR/slurmdbd.conf" 600 <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
DbdAddr=$ctl
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

# ------------------------------------------------------------------ node namespaces (--nodes > 1)

hosts_add() {
  local i lines=""
  for i in $(seq 1 "$NODES"); do lines+="$(node_addr "$i") $(node_name "$i") $HOSTS_TAG"$'\n'; done
  lines+="$CTL_ADDR $CLUSTER-ctld $HOSTS_TAG"$'\n'
  record hosts /etc/hosts
  [ "$(grep -F "$HOSTS_TAG" /etc/hosts 2>/dev/null)"$'\n' != "$lines" ] || return 0  # already there
  hosts_remove
  printf '%s' "$lines" >> /etc/hosts  # appended in place: /etc/hosts may be a bind mount
}

hosts_remove() {
  grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
  local kept
  kept=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
  printf '%s\n' "$kept" > /etc/hosts  # rewritten in place, not replaced
}

net_up() {
  local i name host
  mkdir -p "$STATE/run"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    record bridge "$BRIDGE"
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$CTL_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in $(seq 1 "$NODES"); do
    name=$(node_name "$i") host="$(node_name "$i")-h"
    if [ ! -e "/run/netns/$name" ]; then record netns "$name"; ip netns add "$name"; fi
    if ! ip link show "$host" >/dev/null 2>&1; then
      record link "$host"
      ip link add "$host" type veth peer name "$IFNAME" netns "$name"
    fi
    ip link set "$host" master "$BRIDGE" up
    ip -n "$name" link set lo up
    ip -n "$name" addr replace "$(node_addr "$i")/24" dev "$IFNAME"
    ip -n "$name" link set "$IFNAME" up
    nsenter --net="/run/netns/$name" -- sh -c "echo '$NODE_PORTS' > /proc/sys/net/ipv4/ip_local_port_range"
  done
  hosts_add
}

netns_pids() {  # the processes whose network namespace is netns $1
  local ns pid
  ns=$(stat -L -c %i "/run/netns/$1" 2>/dev/null) || return 0
  for pid in /proc/[0-9]*; do
    [ "$(stat -L -c %i "$pid/ns/net" 2>/dev/null)" = "$ns" ] && echo "${pid#/proc/}"
  done
  return 0
}

net_down() {
  [ -s "$NET_RECORD" ] || return 0
  local kind name pids
  while read -r kind name; do
    case $kind in
      netns)
        [ -e "/run/netns/$name" ] || continue
        # Left over from jobs that slurmd started in it (slurmd itself is stopped by then).
        pids=$(netns_pids "$name" | tr '\n' ' ')
        if [ -n "${pids// /}" ]; then
          say "ending processes left in $name: $pids"
          # shellcheck disable=SC2086
          kill -TERM $pids 2>/dev/null || true; sleep 1
          pids=$(netns_pids "$name" | tr '\n' ' ')
          # shellcheck disable=SC2086
          [ -z "${pids// /}" ] || kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$name" ;;
      link|bridge) ! ip link show "$name" >/dev/null 2>&1 || ip link del "$name" ;;
      hosts) hosts_remove ;;
    esac
  done < <(tac "$NET_RECORD")
  rm -f "$NET_RECORD"
  say "removed the node namespaces, links and /etc/hosts lines"
}

# ------------------------------------------------------------------ SLURM

start_slurmd() {  # start_slurmd DAEMON  (slurmd, or slurmd@NODE in that node's namespaces)
  running_pid "$1" >/dev/null && return
  if [ "$1" = slurmd ]; then
    mkdir -p "$STATE/slurmd/$HOST"
    slurmd
  else
    local node=${1#slurmd@}
    # Its own host name (UTS) and network: slurmd, slurmstepd and the job's tasks all live there.
    # nsenter, not `ip netns exec`: that would remount /sys, and slurmd needs /sys/fs/cgroup.
    mkdir -p "$STATE/slurmd/$node"
    nsenter --net="/run/netns/$node" -- unshare --uts -- sh -c 'hostname "$1" && exec slurmd -N "$1"' sh "$node"
  fi
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
  local daemon
  while read -r daemon; do start_slurmd "$daemon"; done < "$SLURMDS"
  local usable="sinfo -h -N -p $PARTITION -o '%N %T' | grep -Ec ' (idle|mixed|allocated)\$'"
  wait_for 30 "$NODES node(s)" bash -c "[ \$($usable) -eq $NODES ]"
}

slurmd_names() {
  local i
  if [ "$NODES" -eq 1 ]; then echo slurmd; return; fi
  for i in $(seq 1 "$NODES"); do echo "slurmd@$(node_name "$i")"; done
}

stop_slurmds() {
  local daemon
  if [ -s "$SLURMDS" ]; then
    while read -r daemon; do stop_daemon "$daemon"; done < "$SLURMDS"
  fi
  stop_daemon slurmd  # a slurmd of an older version of this script
}

cmd_start() {
  while [ $# -gt 0 ]; do
    case $1 in
      --nodes) [ $# -ge 2 ] || die "--nodes needs a number"; NODES=$2; shift 2 ;;
      --nodes=*) NODES=${1#--nodes=}; shift ;;
      *) die "start: unknown argument $1 (usage: start [--nodes N])" ;;
    esac
  done
  [[ $NODES =~ ^[0-9]+$ ]] && [ "$NODES" -ge 1 ] && [ "$NODES" -le 50 ] || die "--nodes $NODES: give 1 to 50"
  [ "$NODES" -eq 1 ] || PACKAGES+=(iproute2)
  preflight
  install_packages
  write_configs
  local layout
  layout=$(slurmd_names)
  if [ ${#CHANGED[@]} -gt 0 ] || [ "$layout" != "$(cat "$SLURMDS" 2>/dev/null)" ]; then
    if running_pid slurmctld >/dev/null || [ -s "$NET_RECORD" ]; then
      say "config changed (${CHANGED[*]:-node layout}): restarting the SLURM daemons"
    fi
    stop_slurmds; stop_daemon slurmctld; stop_daemon slurmdbd
    net_down
  fi
  echo "$layout" > "$SLURMDS"
  start_munged
  start_mariadb
  [ "$NODES" -eq 1 ] || net_up
  start_slurm
  if [ "$NODES" -eq 1 ]; then
    say "up: partition $PARTITION, node $HOST ($CPUS CPUs), cluster $CLUSTER with accounting; state in $STATE"
  else
    say "up: partition $PARTITION, $NODES nodes $(node_name 1)..$(node_name "$NODES") ($CPUS CPUs each, netns + host" \
        "name each, $SUBNET.11.., bridge $BRIDGE $CTL_ADDR), cluster $CLUSTER with accounting; state in $STATE"
  fi
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
  stop_slurmds
  net_down
  stop_daemon slurmctld
  stop_daemon slurmdbd
  stop_daemon mariadbd
  stop_daemon munged
}

cmd_status() {
  local name pid rc=0 daemons=(munged mariadbd slurmdbd slurmctld)
  [ -s "$SLURMDS" ] && mapfile -t -O 4 daemons < "$SLURMDS"
  for name in "${daemons[@]}"; do
    if pid=$(running_pid "$name"); then echo "$name: running ($pid)"; else echo "$name: stopped"; rc=1; fi
  done
  if [ -s "$NET_RECORD" ]; then echo "made by start (removed by stop):"; sed 's/^/  /' "$NET_RECORD"; fi
  if [ $rc -eq 0 ]; then
    sinfo -N -o "%N %T %c %o"
    sacctmgr -n list cluster format=cluster,controlhost,controlport
  fi
  return $rc
}

cmd_env() {
  [ -e "$SLURM_CONF" ] || echo "local_cluster: note: $SLURM_CONF does not exist yet (run: $0 start)" >&2
  echo "export SLURM_CONF=$SLURM_CONF"
}

cmd=${1:-}
[ $# -eq 0 ] || shift
case "$cmd" in
  start) cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) echo "usage: $0 start [--nodes N]|stop|status|env" >&2; exit 2 ;;
esac
