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
# its own; foreground commands run in a second, long-lived shell, so the agent goes on
# reading hvc0 while one runs, and a kill request "K N" (the host sends it when a
# command outlives its budget) kills command N's group: the command and everything it
# started that stayed in its group. Its end, "D N 137", follows as for any command.
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
GROUP=/run/umtt-group
POWEROFF=/run/umtt-poweroff  # agent.POWEROFF_COMMAND
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
        exec 3>&- 4>&- 5>&- 6>&-
        # A foreground command over the console says which process group it leads.
        [ -n "${2:-}" ] && echo "$2 $BASHPID" > "$GROUP"
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
    local n kill
    # raw: no echo, no line editing, bytes as they are (one process, once). The hvc
    # driver resets the modes when the last descriptor closes: set them on ours.
    exec 4<>/dev/hvc0
    stty raw -echo <&4
    # Job control: every command leads a process group of its own.
    set -m
    # Pipes to and from it, made by bash itself (no mkfifo process); bash's notices of
    # killed jobs would go to the kernel's console.
    coproc FOREGROUND { serve_foreground 2> /dev/null; }
    exec 5>&"${FOREGROUND[1]}" 6<&"${FOREGROUND[0]}"
    echo R >&4
    while read -r -u 4 n kill; do
        [[ $kill =~ ^[0-9]{0,9}$ ]] || continue
        if [ "$n" = K ]; then
            stop_foreground "$kill"
        elif [[ $n =~ ^[0-9]{1,9}$ ]] && [ -e "$X/cmd/$n/background" ]; then
            { run_one "$X/cmd/$n"; echo "D $n $status" 2> /dev/null > /dev/hvc0; } 4>&- 5>&- 6>&- &
            disown
        elif [[ $n =~ ^[0-9]{1,9}$ ]]; then
            echo "$n" >&5
        fi
    done
    # The console ends when the kernel powers off: its devices go in the exitcalls,
    # before the halt. init must not exit then, or the kernel panics ("Attempted to kill
    # init") instead of halting, and a coverage kernel, ended by its panic, writes no
    # counts. So wait on the foreground shell's output, where nothing comes.
    if [ -e "$POWEROFF" ]; then
        while read -r -u 6 _; do :; done
    fi
}

# Foreground commands one after the other, while the loop above goes on reading hvc0:
# it passes them on, and kills the one running when the host asks.
serve_foreground() {
    local n
    set -m
    while read -r n; do
        run_one "$X/cmd/$n" "$n"
        echo "$n done" > "$GROUP"
        echo "D $n $status" >&4
    done
}

# Kill request for foreground command $1: its whole process group. Until the command
# has said which group it leads, wait a virtual millisecond at a time (on fd 6, the
# foreground shell's output, where nothing comes).
stop_foreground() {
    local tries n group
    [ -n "$1" ] || return
    for (( tries = 0; tries < 1000; tries++ )); do
        read -r n group < "$GROUP" 2> /dev/null
        if [ "${n:-0}" = "$1" ]; then
            [ "$group" = done ] || kill -KILL -- "-$group" 2> /dev/null
            return
        fi
        (( ${n:-0} > $1 )) && return
        read -r -t 0.001 -u 6 _
    done
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
