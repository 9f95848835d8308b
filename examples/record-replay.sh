#!/usr/bin/env bash
# Record a migration and replay it into a fresh daemon; then the same with one that fails.
#
#   examples/record-replay.sh [SIZE]     SIZE of the device, default 16M
#
# Uses `vfio-multifd` from PATH, or else the project's .venv. Every daemon listens
# on a unix socket in a temporary directory (removed at the end).
#   1. `receive --record DIR` takes a device sent in random order over 4 channels:
#      DIR then holds channel-<id>.bin (each channel's bytes exactly as received,
#      handshake first) and manifest.json.
#   2. `vfio-multifd replay DIR` sends those bytes to a fresh daemon (not
#      recording): its data and config files are byte-equal to the first one's.
#   3. A migration that fails (`send --inject duplicate`) is recorded too; its
#      replay into a fresh daemon fails with the same error line.
# Exit status 0 only if both hold.
set -euo pipefail

size=${1:-16M}
project=$(cd "$(dirname "$0")/.." && pwd)
if command -v vfio-multifd >/dev/null; then
    tool=(vfio-multifd)
elif [[ -x $project/.venv/bin/vfio-multifd ]]; then
    tool=("$project/.venv/bin/vfio-multifd")
else
    echo "record-replay: no vfio-multifd on PATH and no $project/.venv (run make install)" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vfio-multifd-record.XXXXXX")
daemons=()
cleanup() {
    for pid in "${daemons[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

device="0000:00:02.0/vfio"

# receive NAME [OPTION...]: a daemon in the background on unix:$work/NAME.sock, writing
# $work/NAME.bin; its summary goes to NAME.out, its log and errors to NAME.log.
receive() {
    local name=$1
    shift
    "${tool[@]}" receive --listen "unix:$work/$name.sock" --channels 4 --no-fsync \
        --progress-interval 0 --accept-timeout 30 \
        --device "idstr=$device,data=$work/$name.bin" "$@" \
        >"$work/$name.out" 2>"$work/$name.log" &
    daemons+=($!)
}
send() {  # send NAME [OPTION...]: the device to the daemon NAME (it retries until it listens)
    local name=$1
    shift
    "${tool[@]}" send --connect "unix:$work/$name.sock" --channels 4 --order random \
        --device "idstr=$device,size=$size,seed=7" --log-format json "$@" \
        >"$work/send-$name.out" 2>"$work/send-$name.log"
}
last_line() { tail -n 1 "$work/$1.log"; }

echo "record-replay: 1. a migration of $size over 4 channels, recorded in \$work/recording"
receive original --record "$work/recording"
original=$!
send original
wait "$original"
ls "$work/recording"
grep -E '"(outcome|complete|id|bytes|end)"' "$work/recording/manifest.json" | tr -d ' ,' | paste -sd ' '
echo

echo "record-replay: 2. the recording replayed into a fresh daemon"
receive replayed
replayed=$!
"${tool[@]}" replay "$work/recording" --connect "unix:$work/replayed.sock" --log-format json \
    2>"$work/replay.log"
wait "$replayed"
cmp "$work/original.bin" "$work/replayed.bin"
cmp "$work/original.bin.config" "$work/replayed.bin.config"
echo "record-replay: the replayed daemon's files are byte-equal to the original's"
echo

echo "record-replay: 3. a migration that fails (send --inject duplicate), recorded and replayed"
receive failing --record "$work/failed-recording"
failing=$!
send failing --inject duplicate || true  # the daemon's exit code and error are the verdict
status=0
wait "$failing" || status=$?
original_error=$(last_line failing)
echo "original: exit $status, $original_error"
receive refailing
refailing=$!
"${tool[@]}" replay "$work/failed-recording" --connect "unix:$work/refailing.sock" \
    --log-format json 2>"$work/replay-failed.log" || true
replay_status=0
wait "$refailing" || replay_status=$?
replayed_error=$(last_line refailing)
echo "replay:   exit $replay_status, $replayed_error"
if ((status == 1 && replay_status == 1)) && [[ $original_error == "$replayed_error" ]]; then
    echo "record-replay: the replay failed with the same error"
else
    echo "record-replay: the replay did NOT fail as the original did" >&2
    exit 1
fi
