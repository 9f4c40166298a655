#!/usr/bin/env bash
# A throwaway single-machine Slurm cluster for the tests: one controller and two fake nodes (n1, n2).
#
#   tests/slurm/local_cluster.sh up <state_dir>      start it; stdout is one line, SLURM_CONF=<path>, to export
#   tests/slurm/local_cluster.sh down <state_dir>    cancel its jobs, stop its daemons, undo the /etc/hosts line
#   tests/slurm/local_cluster.sh status [<state_dir>]  daemons and nodes (state dir default: that of $SLURM_CONF)
#
# Needs root and Debian's slurm-wlm + munge (tests/slurm/install.sh). Everything lives in <state_dir>: its own
# munged (private socket and key), slurm.conf, controller state, spool directories, logs and PID files. Daemons
# are stopped by the PIDs recorded there, never by name. `down` is safe after a failed or partial `up`.
#
# Knobs (environment): MUCO_SLURM_PORT (controller port, default 6817; the nodes take the next two),
# MUCO_SLURM_CPUS (CPUs each fake node advertises, default 2), MUCO_SLURM_HOSTS_FILE (default /etc/hosts).
set -euo pipefail

PATH="$PATH:/usr/sbin:/sbin"   # the daemons live there, which a non-login PATH may lack
HOSTS_FILE=${MUCO_SLURM_HOSTS_FILE:-/etc/hosts}
NODES=(n1 n2)

say() { echo "local_cluster: $*" >&2; }
die() { say "$*"; exit 1; }

# --- helpers -------------------------------------------------------------------------------------------------

# the PID recorded in file $1, if that process is alive and was started for this state dir
live_pid() {
    local file=$1 pid
    [ -s "$file" ] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    # a PID can be reused after a crash: only accept a process whose command line names our state dir
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$STATE/" || return 1
    echo "$pid"
}

# SIGTERM to the daemons recorded in the given PID files, all at once (each takes 1-2 s to exit), then wait;
# SIGKILL what is left after 10 s
stop_pid_files() {
    local file pid i alive pids=()
    for file in "$@"; do
        if pid=$(live_pid "$file"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for i in $(seq 100); do
        alive=()
        for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && alive+=("$pid"); done
        [ ${#alive[@]} = 0 ] && break
        sleep 0.1
    done
    for pid in "${alive[@]}"; do
        say "pid $pid ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$@"
}

hosts_marker() { echo "# muco-local-slurm $STATE"; }

hosts_add() {
    grep -qF -- "$(hosts_marker)" "$HOSTS_FILE" 2>/dev/null && return 0
    # append in place (the file may be a bind mount that cannot be replaced by a rename)
    printf '127.0.0.1 %s %s\n' "${NODES[*]}" "$(hosts_marker)" >>"$HOSTS_FILE"
}

hosts_remove() {
    [ -f "$HOSTS_FILE" ] && grep -qF -- "$(hosts_marker)" "$HOSTS_FILE" || return 0
    local kept
    kept=$(grep -vF -- "$(hosts_marker)" "$HOSTS_FILE" || true)
    printf '%s\n' "$kept" >"$HOSTS_FILE"   # rewrite in place, same inode
}

# every directory on the socket's path must be searchable by all, or munged refuses to start
check_search_path() {
    local d=$1
    while [ "$d" != / ]; do
        if ! [ -x "$d" ] || [ "$(( 8#$(stat -c %a "$d") & 8#001 ))" = 0 ]; then
            die "munged needs every directory above its socket to be world-searchable (o+x); $d is $(stat -c %A "$d"). Use a state dir under /tmp, e.g. \$(mktemp -d) then chmod 755."
        fi
        d=$(dirname "$d")
    done
}

write_conf() {
    local host=$1 port=$2 cpus=$3 i
    {
        echo "# written by tests/slurm/local_cluster.sh: a one-machine test cluster"
        echo "ClusterName=muco-local"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=$port"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        # private munged; short credential lifetime so a requeued job starts again in seconds, not minutes
        echo "AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10"
        echo "StateSaveLocation=$STATE/ctld"
        echo "SlurmctldPidFile=$STATE/slurmctld.pid"
        echo "SlurmctldLogFile=$STATE/log/slurmctld.log"
        echo "SlurmdPidFile=$STATE/slurmd-%n.pid"
        echo "SlurmdLogFile=$STATE/log/slurmd-%n.log"
        echo "SlurmdSpoolDir=$STATE/spool/%n"
        # no systemd, no cgroups, no database
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/none"
        echo "MpiDefault=none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "SchedulerType=sched/backfill"
        echo "SchedulerParameters=sched_interval=2,bf_interval=1"
        # nodes may advertise more CPUs than the machine has
        echo "SlurmdParameters=config_overrides"
        echo "ReturnToService=2"
        echo "KillWait=10"
        echo "MinJobAge=600"
        echo "MailProg=/bin/true"
        for i in "${!NODES[@]}"; do
            echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 1 + i)) CPUs=$cpus State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
    } >"$STATE/slurm.conf.tmp"
    mv "$STATE/slurm.conf.tmp" "$STATE/slurm.conf"
}

all_up() {
    live_pid "$STATE/munge/munged.pid" >/dev/null && live_pid "$STATE/slurmctld.pid" >/dev/null || return 1
    local n
    for n in "${NODES[@]}"; do live_pid "$STATE/slurmd-$n.pid" >/dev/null || return 1; done
}

nodes_idle() {
    local states
    states=$(SLURM_CONF="$STATE/slurm.conf" sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    local n
    for n in "${NODES[@]}"; do
        echo "$states" | grep -qxE "$n (idle|mix|alloc)" || return 1
    done
}

show_logs() {
    local f
    for f in "$STATE"/munge/munged.log "$STATE"/log/*.log; do
        [ -f "$f" ] || continue
        say "--- tail of $f"
        tail -n 15 "$f" >&2
    done
}

# --- commands ------------------------------------------------------------------------------------------------

cmd_up() {
    [ "$(id -u)" = 0 ] || die "needs root (daemons run as root and /etc/hosts gets a line)"
    local bin
    for bin in munged mungekey slurmctld slurmd sbatch sinfo scontrol; do
        command -v "$bin" >/dev/null || die "$bin not found: run tests/slurm/install.sh (Debian slurm-wlm + munge)"
    done
    mkdir -p "$STATE"
    chmod 755 "$STATE"
    check_search_path "$STATE"

    if all_up && nodes_idle; then
        say "already up ($STATE)"
        echo "SLURM_CONF=$STATE/slurm.conf"
        return 0
    fi
    # a half-started earlier attempt: clear it first
    cmd_down >/dev/null 2>&1 || true

    local host port cpus n
    host=$(hostname -s)
    port=${MUCO_SLURM_PORT:-6817}
    cpus=${MUCO_SLURM_CPUS:-2}
    mkdir -p "$STATE/ctld" "$STATE/log"
    mkdir -m 755 -p "$STATE/munge"
    for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n"; done   # slurmd will not create its spool dir
    local p
    for p in $(seq "$port" $((port + ${#NODES[@]}))); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            die "port $p is in use (another cluster? run down on its state dir, or set MUCO_SLURM_PORT)"
        fi
    done
    write_conf "$host" "$port" "$cpus"
    export SLURM_CONF="$STATE/slurm.conf"

    # any failure from here on: show the daemons' logs and undo what was started
    UP_DONE=0
    trap '[ "$UP_DONE" = 1 ] || { say "bring-up failed"; show_logs; cmd_down >/dev/null 2>&1 || true; }' EXIT

    [ -s "$STATE/munge/munge.key" ] || mungekey -c -k "$STATE/munge/munge.key"
    chmod 600 "$STATE/munge/munge.key"
    munged --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/munged.seed"

    hosts_add
    # -f names the config (and so the state dir) on the command line: that is what live_pid checks
    slurmctld -f "$SLURM_CONF"
    for n in "${NODES[@]}"; do
        slurmd -f "$SLURM_CONF" -N "$n"
    done

    local i
    for i in $(seq 150); do   # up to 30 s for the nodes to register; a daemon that died ends it after 3 s
        all_up && nodes_idle && break
        [ "$i" -gt 15 ] && ! all_up && break
        sleep 0.2
    done
    all_up || die "a daemon exited (see the logs below)"
    nodes_idle || die "nodes not idle after 30 s: $(SLURM_CONF=$SLURM_CONF sinfo -h -N -o '%N %t' 2>&1 | tr '\n' ' ')"
    UP_DONE=1
    say "up: nodes ${NODES[*]} idle (state in $STATE)"
    echo "SLURM_CONF=$SLURM_CONF"
}

cmd_down() {
    local conf="$STATE/slurm.conf" jobs i n
    if [ -f "$conf" ] && live_pid "$STATE/slurmctld.pid" >/dev/null; then
        jobs=$(SLURM_CONF=$conf squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [ -n "${jobs// /}" ]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            SLURM_CONF=$conf scancel $jobs 2>/dev/null || true
            # wait until they have left (COMPLETING included: their slurmstepd processes are then gone)
            for i in $(seq 200); do
                [ -z "$(SLURM_CONF=$conf squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.1
            done
        fi
    fi
    local pidfiles=("$STATE/slurmctld.pid")
    for n in "${NODES[@]}"; do pidfiles+=("$STATE/slurmd-$n.pid"); done
    stop_pid_files "${pidfiles[@]}"
    stop_pid_files "$STATE/munge/munged.pid"   # last: the others authenticate through it until they exit
    hosts_remove
    say "down ($STATE)"
}

cmd_status() {
    local conf="$STATE/slurm.conf" n pid rc=0
    [ -f "$conf" ] || { echo "no cluster in $STATE"; return 1; }
    local pairs=("munged:$STATE/munge/munged.pid" "slurmctld:$STATE/slurmctld.pid") pair
    for n in "${NODES[@]}"; do pairs+=("slurmd-$n:$STATE/slurmd-$n.pid"); done
    for pair in "${pairs[@]}"; do
        n=${pair%%:*}
        if pid=$(live_pid "${pair#*:}"); then echo "$n: running (pid $pid)"; else echo "$n: stopped"; rc=1; fi
    done
    if [ $rc = 0 ]; then
        SLURM_CONF=$conf sinfo -N || rc=1
        SLURM_CONF=$conf squeue || rc=1
    fi
    echo "SLURM_CONF=$conf"
    return $rc
}

cmd=${1:-}
case "$cmd" in
    up|down)
        [ $# = 2 ] || die "usage: $0 $cmd <state_dir>"
        if [ "$cmd" = up ]; then mkdir -p "$2" || die "cannot create state dir $2"; fi
        if [ "$cmd" = down ] && ! [ -d "$2" ]; then say "no state dir $2: nothing to stop"; exit 0; fi
        STATE=$(cd "$2" && pwd -P) || die "cannot use state dir $2"
        "cmd_$cmd"
        ;;
    status)
        dir=${2:-}
        if [ -z "$dir" ]; then
            [ -n "${SLURM_CONF:-}" ] || die "usage: $0 status <state_dir> (or export SLURM_CONF)"
            dir=$(dirname "$SLURM_CONF")
        fi
        STATE=$(cd "$dir" 2>/dev/null && pwd -P) || die "no state dir $dir"
        cmd_status
        ;;
    *)
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
