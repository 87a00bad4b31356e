#!/usr/bin/env bash
# A throwaway one-node SLURM cluster on this Debian machine, for tests/test_slurm.py:
#   sudo bash tests/slurm/setup_slurm.sh          install (Debian's packages), configure, start; idempotent
#   sudo bash tests/slurm/setup_slurm.sh stop     stop the SLURM daemons (munge and MariaDB stay up)
# What it sets up:
#   - munge, MariaDB and slurmdbd: the executor plugin asks sacct for job states and sacctmgr for the account, both
#     need accounting; cluster "pmoe", account "pmoe" for root and the invoking (sudo) user;
#   - slurmctld and slurmd on this host: one node with its CPUs and memory (slurmd -C), partitions "cpu" (default)
#     and "gpu" on that same node, and one fake GPU per CPU: a GRES whose device file is a copy of /dev/null
#     (gres.conf, AutoDetect=off), so the workflow's gpu=1 (--gpus=1) is scheduled on the gpu partition.
# It refuses to touch a slurm.conf it did not write (a real cluster's). Needs root only for what is not done yet.
set -euo pipefail

CLUSTER=pmoe
ACCOUNT=pmoe
MARK="# written by pmoe-backdoor tests/slurm/setup_slurm.sh"
CONF=/etc/slurm/slurm.conf
GRES_CONF=/etc/slurm/gres.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
DB_PASS=pmoe-slurm-test  # a MariaDB user reachable from localhost only, on a throwaway machine
LOGDIR=/var/log/slurm
FAKE=/var/lib/slurm/fake-gpus
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)

say() { echo "setup_slurm: $*"; }
die() { echo "setup_slurm: ERROR: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root: sudo bash $0"; }

wait_for() {  # wait_for SECONDS COMMAND...: poll every 0.5 s until COMMAND succeeds
  local limit=$1 i
  shift
  for ((i = 0; i < limit * 2; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  return 1
}

running() { [ -f "$1" ] && [ -d "/proc/$(cat "$1")" ]; }  # running PIDFILE (kill -0 fails for others' processes)

stop_daemon() {  # stop_daemon NAME PIDFILE: SIGTERM the pid in its pid file, wait for it to go
  if running "$2"; then
    need_root "stopping $1"
    local pid
    pid=$(cat "$2")
    kill "$pid"
    wait_for 30 bash -c "[ ! -d /proc/$pid ]" || die "$1 (pid $pid) did not stop"
    say "stopped $1"
  fi
}

start_service() {  # start_service NAME: systemd where it runs, else the package's init script
  need_root "starting $1"
  if [ -d /run/systemd/system ]; then systemctl start "$1"; else "/etc/init.d/$1" start >/dev/null; fi
}

if [ -f "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
  die "$CONF exists and was not written by this script (a real cluster?): not touching it"
fi
if [ "${1:-}" = stop ]; then
  stop_daemon slurmd /run/slurmd.pid
  stop_daemon slurmctld /run/slurmctld.pid
  stop_daemon slurmdbd /run/slurmdbd.pid
  exit 0
fi
[ $# = 0 ] || die "usage: $0 [stop]"

# ----- packages -----
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  need_root "installing ${missing[*]}"
  command -v apt-get >/dev/null || die "needs a Debian-like system with apt-get"
  say "installing ${missing[*]}"
  start=$SECONDS
  apt-get update -q >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
    >/tmp/setup_slurm_apt.log 2>&1 \
    || { tail -20 /tmp/setup_slurm_apt.log >&2; die "apt-get install failed (log: /tmp/setup_slurm_apt.log)"; }
  say "installed in $((SECONDS - start)) s: slurm $(dpkg-query -W -f '${Version}' slurmctld)"
fi

# ----- configuration -----
NODE=$(hostname -s)
# slurmd -C: this machine's CPUs, sockets, cores, threads and memory as slurmd will find them
HW=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //')
CPUS=$(sed -E 's/.*CPUs=([0-9]+).*/\1/' <<<"$HW")
MEM=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$HW")
[ "$MEM" -ge 4000 ] || say "warning: $MEM MB of memory; profiles/slurm asks 4000 MB per CPU job, which cannot run here"
# fake GPUs, one per CPU (GPU jobs run as many at once as the CPUs allow, as in a local run): slurmd drops a GPU
# without a device file and complains about one that is not a device, so each is a character device node like
# /dev/null (1,3); where mknod is not allowed (a container without CAP_MKNOD), /dev/null itself: one fake GPU
GPUS=$CPUS
for ((k = 0; k < CPUS; k++)); do
  [ -c "$FAKE/gpu$k" ] && continue
  if [ "$(id -u)" = 0 ] && mkdir -p "$FAKE" && mknod "$FAKE/gpu$k" c 1 3 2>/dev/null; then continue; fi
  GPUS=0
  break
done
if [ "$GPUS" = 0 ]; then
  GPUS=1 GPU_FILES=/dev/null
  say "no fake GPU device nodes in $FAKE (mknod needs root and CAP_MKNOD): one fake GPU, /dev/null"
else
  GPU_FILES="$FAKE/gpu[0-$((GPUS - 1))]"
fi

new_conf=$(cat <<EOF
$MARK
# One node, two partitions on it, fake GPUs (GRES on copies of /dev/null); accounting through slurmdbd.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=300
MessageTimeout=10
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 $HW Gres=gpu:$GPUS State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
)
new_gres=$(printf '%s\nAutoDetect=off\nNodeName=%s Name=gpu File=%s\n' "$MARK" "$NODE" "$GPU_FILES")
new_dbd=$(cat <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
LogFile=$LOGDIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
EOF
)
changed=0
write_conf() {  # write_conf FILE CONTENT MODE: write it if it differs (slurmdbd.conf: only root can read it)
  if [ -f "$1" ] && [ ! -r "$1" ] && [ "$(id -u)" != 0 ]; then return 0; fi
  if [ "$(cat "$1" 2>/dev/null)" != "$2" ]; then
    need_root "writing $1"
    printf '%s\n' "$2" >"$1"
    chmod "$3" "$1"
    changed=1
    say "wrote $1"
  fi
}
if [ "$(id -u)" = 0 ]; then
  mkdir -p /etc/slurm "$LOGDIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
  chown slurm:slurm "$LOGDIR" /var/lib/slurm/slurmctld
fi
write_conf "$CONF" "$new_conf" 644
write_conf "$GRES_CONF" "$new_gres" 644
write_conf "$DBD_CONF" "$new_dbd" 600  # slurmdbd insists: the database password is in it
[ "$(id -u)" != 0 ] || chown slurm:slurm "$DBD_CONF"
if [ $changed = 1 ]; then  # a running daemon would keep the old configuration
  stop_daemon slurmd /run/slurmd.pid
  stop_daemon slurmctld /run/slurmctld.pid
  stop_daemon slurmdbd /run/slurmdbd.pid
fi

# ----- munge -----
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    need_root "creating the munge key"
    mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
  fi
  start_service munge
  wait_for 20 bash -c "munge -n | unmunge" || die "munged did not start (see /var/log/munge/munged.log)"
  say "started munged"
fi

# ----- MariaDB and slurmdbd -----
if ! running /run/slurmdbd.pid; then
  if ! mariadb-admin ping >/dev/null 2>&1; then
    start_service mariadb
    wait_for 60 mariadb-admin ping || die "MariaDB did not start (see /var/log/mysql/error.log)"
    say "started MariaDB"
  fi
  need_root "starting slurmdbd"
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "could not create the MariaDB user slurm"
  slurmdbd || die "slurmdbd did not start (see $LOGDIR/slurmdbd.log)"
  # sacctmgr answers once slurmdbd has connected to MariaDB and listens
  wait_for 60 sacctmgr -n show cluster || die "slurmdbd does not answer (see $LOGDIR/slurmdbd.log)"
  say "started slurmdbd"
fi
if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
  need_root "adding cluster $CLUSTER"
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
  say "added cluster $CLUSTER to the accounting database"
fi
if ! sacctmgr -n -P show account "$ACCOUNT" format=account | grep -qx "$ACCOUNT"; then
  need_root "adding account $ACCOUNT"
  sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description=pmoe-backdoor-test organization=pmoe >/dev/null
  say "added account $ACCOUNT"
fi
for user in root ${SUDO_USER:-} "$(id -un)"; do
  if ! sacctmgr -n -P show assoc account="$ACCOUNT" user="$user" format=user | grep -qx "$user"; then
    need_root "adding user $user to account $ACCOUNT"
    sacctmgr -i add user "$user" account="$ACCOUNT" defaultaccount="$ACCOUNT" cluster="$CLUSTER" >/dev/null
    say "added user $user to account $ACCOUNT"
  fi
done

# ----- slurmctld and slurmd -----
if ! running /run/slurmctld.pid; then
  need_root "starting slurmctld"
  slurmctld || die "slurmctld did not start (see $LOGDIR/slurmctld.log)"
  wait_for 60 bash -c "scontrol ping | grep -q UP" || die "slurmctld does not answer (see $LOGDIR/slurmctld.log)"
  say "started slurmctld"
fi
if ! running /run/slurmd.pid; then
  need_root "starting slurmd"
  slurmd || die "slurmd did not start (see $LOGDIR/slurmd.log)"
  say "started slurmd"
fi
state=""
for ((i = 0; i < 120; i++)); do
  state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1)
  case $state in
    idle | mixed | allocated) break ;;
    inval*) break ;;  # slurm.conf does not match what slurmd found: waiting will not help
    down* | drain* | *fail*)  # a node left down by an earlier run (e.g. a restart): bring it back once
      if [ $i = 10 ]; then scontrol update nodename="$NODE" state=resume 2>/dev/null || true; fi ;;
  esac
  sleep 0.5
done
case $state in
  idle | mixed | allocated) ;;
  *) die "node $NODE is '$state', not idle: $(sinfo -h -R -o '%E' | head -1) (see $LOGDIR/slurmd.log, slurmctld.log)" ;;
esac
say "the cluster is up: $(sinfo -h -o '%P %a %D %T %G' | paste -sd ';'); account $ACCOUNT"
