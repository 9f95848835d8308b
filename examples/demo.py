"""``make demo``: a daemon and a sender end to end on loopback.

Starts ``vfio-multifd receive`` on a free port in a temporary directory, sends
two devices over four channels in random order with ``vfio-multifd send``,
prints both summaries and says whether every digest matches. Exit status 0
only if the daemon and the sender succeeded and the digests agree.

    python examples/demo.py [--size 192M] [--channels 4] [--order random] [--keep]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEVICES = ("0000:00:02.0/vfio", "0000:00:03.0/vfio")


def tool() -> list[str]:
    exe = Path(sys.executable).with_name("vfio-multifd")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vfio_multifd"]


def wait_for_port(daemon: subprocess.Popen[str], timeout: float = 20.0) -> str:
    """Read the daemon's JSON log until it says where it listens."""
    assert daemon.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = daemon.stderr.readline()
        if not line:
            break
        print(f"  daemon log: {line.rstrip()}")
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "listening":
            return str(event["address"])
    raise SystemExit(f"daemon did not start listening (exit {daemon.poll()})")


def digests(text: str) -> dict[str, str]:
    return dict(re.findall(r"^device (\S+): .*?(\w[\w-]*:[0-9a-f]{16,})", text, re.MULTILINE))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="192M", help="bytes per device (default 192M)")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--order", default="random", choices=["round-robin", "reverse", "random"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="vfio-multifd-demo-"))
    kept = "kept, as --keep asks" if args.keep else "deleted at the end unless --keep"
    print(f"demo: {len(DEVICES)} devices x {args.size}, {args.channels} channels, "
          f"{args.order} order, outputs in {workdir} ({kept})")
    receive = [*tool(), "receive", "--listen", "tcp:127.0.0.1:0", "--channels",
               str(args.channels), "--log-format", "json", "--accept-timeout", "60"]
    send = [*tool(), "send", "--channels", str(args.channels), "--order", args.order,
            "--seed", "1", "--log-format", "json"]
    for n, idstr in enumerate(DEVICES):
        receive += ["--device", f"idstr={idstr},instance=0,data={workdir / f'dev{n}.bin'}"]
        send += ["--device", f"idstr={idstr},instance=0,size={args.size},seed={n + 1}"]
    daemon = subprocess.Popen(receive, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = wait_for_port(daemon)
        print(f"demo: daemon listening on {address}; sending")
        sender = subprocess.run([*send, "--connect", address], capture_output=True, text=True,
                                timeout=600)
        daemon_out, daemon_err = daemon.communicate(timeout=600)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    print("\n--- sender summary ---\n" + sender.stdout)
    if sender.returncode:
        print(sender.stderr[-3000:])
    print("--- daemon summary ---\n" + daemon_out)
    if re.search(r"spilled [1-9]", daemon_out) and args.order != "round-robin":
        print(f"demo: it spilled because chunks sent in {args.order} order come early: they wait "
              "in memory, and past the daemon's default bound (--max-queued-bytes 64M) the ones "
              "needed last go to disk until their turn.\n")
    if daemon.returncode:
        print(daemon_err[-3000:])
    sent, received = digests(sender.stdout), digests(daemon_out)
    ok = sender.returncode == 0 and daemon.returncode == 0 and sent and sent == received
    for idstr in DEVICES:
        mark = "match" if sent.get(idstr) and sent.get(idstr) == received.get(idstr) else "DIFFER"
        print(f"{idstr}: sent {sent.get(idstr)} received {received.get(idstr)}: {mark}")
    print(f"demo: {'digests match' if ok else 'FAILED'} "
          f"(sender exit {sender.returncode}, daemon exit {daemon.returncode})")
    if args.keep:
        print(f"demo: kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
