#!/bin/bash
# pytest-umtt guest agent: init of every UML machine.
#
# Its host side is pytest_umtt/uml/agent.py (the same kinds and layout) and the two
# channels, uml/channel_files.py and uml/channel_console.py. The machine
# directory is mounted read-write at /mnt. The host writes a command into cmd/N/ and
# then cmd/N.go, always while the simulation is paused, so a run never depends on host
# speed (DESIGN.md fact 8).
# The agent answers by ringing the doorbell (/sys/kernel/um-ext-time/bc-message,
# DESIGN.md fact 6) with (N << 8) | KIND and then reading the clock: that clock read
# is a time step, so the kernel yields right there and the host acts at that instant.
#
# While idle the agent polls with bash's builtin `read -t` on a private FIFO (no
# process is created), backing off exponentially up to UMTT_IDLE_MAX_US; a finishing
# background command pokes the FIFO so the agent looks again at once.
#
# With UMTT_AGENT_CHANNEL=console (the kernel has virtio-console and the host serves it
# as the first console, /dev/hvc0), none of that: the agent blocks reading hvc0, the
# host writes "N" there at the instant a test submits command N (an interrupt at that
# virtual instant), and the agent answers "D N STATUS" when it ends: no polling, no
# doorbell, and an idle machine costs nothing. Each command runs in a process group of
# its own while the agent goes on reading hvc0, so a kill request "K N" (the host sends
# it when a command outlives its budget) ends the command with everything it started
# that stayed in its group, and the agent answers "D N 137".
#
# Over the polled files the agent hears nothing while a foreground command runs: the
# host writes the command's budget into its "timeout" file, and timeout(1) (which makes
# the command a process group of its own) kills the group at that instant.
#
# The host takes every time from the doorbells, never from the guest's clock (a test
# may set it): the main loop rings when ready, when it starts a command after having
# idled (or in the background), and when a foreground command ends. A command it
# starts without idling starts at the instant of the loop's previous ring.

X=/mnt
BELL=/sys/kernel/um-ext-time/bc-message
IDLE=/run/umtt-idle
READY=1 DONE=2 STARTED=3  # agent.Bell
IDLE_MIN_US=1000
IDLE_MAX_US=${UMTT_IDLE_MAX_US:-100000}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp LANG=C.UTF-8

setup() {
    # The kernel's modules, read-only from the host (agent.py install, MODULES_LINK),
    # first: mount -a may load a filesystem's module (configfs=m) through modprobe.
    if [ -L "$X/lib-modules" ]; then
        mkdir -p /lib/modules && mount -t hostfs -o ./lib-modules,ro none /lib/modules
    fi
    # One mount(8) for all: each process costs UML ~16 ms of wall time to create.
    mount -a -T "$X/fstab"
    # configfs built as a module has no /sys/kernel/config until it is loaded: load and
    # mount it as a distribution's init does (drivers' tests configure devices there).
    if [ -L "$X/lib-modules" ] && [ ! -d /sys/kernel/config ]; then
        modprobe -q configfs && mount -t configfs configfs /sys/kernel/config
    fi
    # An initramfs root gets no automatic devtmpfs; a hostfs root does.
    local _dev mnt _rest
    while read -r _dev mnt _rest; do [ "$mnt" = /dev ] && break; done < /proc/mounts
    [ "$mnt" = /dev ] || mount -t devtmpfs devtmpfs /dev
    [ -n "${UMTT_HOSTNAME:-}" ] && echo "$UMTT_HOSTNAME" > /proc/sys/kernel/hostname
}

# The FIFO costs a process, so it is made only when first needed: before the agent first
# idles, or before a background command that will poke it.
idle_fd() {
    [ -p "$IDLE" ] && return
    mkfifo -m 600 "$IDLE" && exec 3<>"$IDLE"
}

ring() {
    echo "$1" > "$BELL"
    : "$EPOCHREALTIME"
}

run_one() {
    local dir=$1 cwd=/
    [ -e "$dir/cwd" ] && cwd=$(<"$dir/cwd")
    (
        exec 3>&- 4>&-
        if [ -e "$dir/env" ]; then
            while IFS= read -r -d '' assignment; do export "$assignment"; done < "$dir/env"
        fi
        cd "$cwd" || exit 126
        if [ -e "$dir/timeout" ]; then
            exec timeout -s KILL "$(<"$dir/timeout")" /bin/bash "$dir/command"
        fi
        . "$dir/command"
    ) < /dev/null > "$dir/stdout" 2> "$dir/stderr"
    status=$?
}

serve_console() {
    local n kill leaders=()
    # raw: no echo, no line editing, bytes as they are (one process, once). The hvc
    # driver resets the modes when the last descriptor closes: set them on ours.
    exec 4<>/dev/hvc0
    stty raw -echo <&4
    # Job control: every command started with & leads a process group of its own.
    set -m
    echo R >&4
    while read -r -u 4 n kill; do
        [[ $kill =~ ^[0-9]{0,9}$ ]] || continue
        if [ "$n" = K ]; then
            stop_group "$kill"
            continue
        fi
        [[ $n =~ ^[0-9]{1,9}$ ]] || continue
        { run_one "$X/cmd/$n"; echo "D $n $status" > /dev/hvc0; } 4>&- &
        leaders[n]=$!
        # Forgotten by the job table (its end is reported above), so no "Killed" notice.
        disown
    done
}

# Kill request for command $1: its whole process group, then its end, as SIGKILL's status.
stop_group() {
    local leader=${leaders[$1]:-}
    [ -n "$leader" ] || return
    unset "leaders[$1]"
    kill -KILL -- "-$leader" 2> /dev/null
    echo "D $1 137" >&4
}

serve() {
    local n=1 idle_us=$IDLE_MIN_US dir timeout idled=0
    ring $(( (0 << 8) | READY ))
    while :; do
        dir=$X/cmd/$n
        if [ -e "$dir.go" ]; then
            if [ -e "$dir/background" ]; then
                idle_fd
                { run_one "$dir"; echo "$status" > "$dir/result"
                  ring $(( (n << 8) | DONE )); echo >&3; } &
                ring $(( (n << 8) | STARTED ))
            else
                (( idled )) && ring $(( (n << 8) | STARTED ))
                run_one "$dir"
                echo "$status" > "$dir/result"
                ring $(( (n << 8) | DONE ))
            fi
            n=$(( n + 1 ))
            idle_us=$IDLE_MIN_US idled=0
            continue
        fi
        idle_fd
        printf -v timeout '%d.%06d' $(( idle_us / 1000000 )) $(( idle_us % 1000000 ))
        read -r -t "$timeout" -u 3 _
        idled=1
        (( idle_us < IDLE_MAX_US )) && idle_us=$(( idle_us * 2 > IDLE_MAX_US ? IDLE_MAX_US : idle_us * 2 ))
    done
}

setup
if [ "${UMTT_AGENT_CHANNEL:-}" = console ]; then
    serve_console
else
    serve
fi
