#!/usr/bin/env bash
# A loopback migration with the command line: two devices over four channels.
#
#   examples/loopback.sh [SIZE]       SIZE per device, default 64M
#
# Uses `vfio-multifd` from PATH, or else the project's .venv. Starts the daemon
# on a unix socket with --ready-fd (a newline once it listens) and
# --status-socket, sends two generated devices in random order with
# `vfio-multifd send`, asks `vfio-multifd status` what it sees, and checks
# that every digest the sender computed is the one the daemon wrote.
# Exit status 0 only if both sides succeeded and the digests match.
set -euo pipefail

size=${1:-64M}
project=$(cd "$(dirname "$0")/.." && pwd)
if command -v vfio-multifd >/dev/null; then
    tool=(vfio-multifd)
elif [[ -x $project/.venv/bin/vfio-multifd ]]; then
    tool=("$project/.venv/bin/vfio-multifd")
else
    echo "loopback: no vfio-multifd on PATH and no $project/.venv (run make install)" >&2
    exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vfio-multifd-loopback.XXXXXX")
daemon=
cleanup() {
    [[ -n $daemon ]] && kill "$daemon" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

devices=("0000:00:02.0/vfio" "0000:00:03.0/vfio")
receive=("${tool[@]}" receive --listen "unix:$work/migrate.sock" --channels 4
         --status-socket "$work/status.sock" --ready-fd 3 --no-fsync --progress-interval 1
         --accept-timeout 30)
send=("${tool[@]}" send --connect "unix:$work/migrate.sock" --channels 4 --order random)
for n in "${!devices[@]}"; do
    receive+=(--device "idstr=${devices[n]},data=$work/dev$n.bin")
    send+=(--device "idstr=${devices[n]},size=$size,seed=$((n + 1))")
done

mkfifo "$work/ready"
"${receive[@]}" 3>"$work/ready" >"$work/receive.out" 2>"$work/receive.log" &
daemon=$!
# The daemon writes one newline to fd 3 once it listens, then closes it;
# EOF without the newline means it exited first.
if ! read -r -t 20 _ <"$work/ready"; then
    echo "loopback: the daemon did not become ready:" >&2
    cat "$work/receive.log" >&2
    exit 1
fi
echo "loopback: daemon ready on unix:$work/migrate.sock; sending 2 x $size over 4 channels"
"${tool[@]}" status --socket "$work/status.sock"
echo

"${send[@]}" >"$work/send.out" 2>"$work/send.log" &
sender=$!
sleep 0.2
# Mid-transfer (or already done, for a small SIZE: then the socket is gone).
"${tool[@]}" status --socket "$work/status.sock" 2>/dev/null || echo "(already finished)"
echo

send_status=0 receive_status=0
wait "$sender" || send_status=$?
# A sender that failed may leave the daemon waiting for channels: stop it
# (SIGTERM cancels: exit 143, no output file left behind).
((send_status)) && kill -TERM "$daemon" 2>/dev/null
wait "$daemon" || receive_status=$?
daemon=

echo "--- sender (exit $send_status) ---"
cat "$work/send.out"
echo "--- daemon (exit $receive_status) ---"
cat "$work/receive.out"
if ((send_status || receive_status)); then
    tail -n 5 "$work/send.log" "$work/receive.log" >&2
    exit 1
fi
digests() { sed -n 's/^device \([^ ]*\): .*\(xxh3-128:[0-9a-f]*\).*/\1 \2/p' "$1"; }
sent=$(digests "$work/send.out")
received=$(digests "$work/receive.out")
echo "$received"
if [[ $(wc -l <<<"$sent") -eq ${#devices[@]} && $sent == "$received" ]]; then
    echo "loopback: digests match"
else
    echo "loopback: digests DIFFER" >&2
    exit 1
fi
