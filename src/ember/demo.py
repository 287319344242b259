"""Ember's main job, end to end, on its embedded defaults.

Starts a daemon if none answers (SQLite and local storage under
EMBER_DATA_DIR), prepares the built-in ``debian`` image, launches a VM from
its snapshot, starts a process holding a value in memory and writes a file,
suspends the VM, resumes it, and shows that the process, its value and the
file all survived. Prints each step with its timing; exits non-zero on any
failure.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from ember.config import Settings
from ember.sdk import Client, ConnectError, EmberError

# A guest process that keeps a random value in memory and serves it on loopback.
HOLDER = """
import os, socket
value = os.urandom(8).hex()
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 9000)); srv.listen()
print(value, flush=True)
while True:
    conn, _ = srv.accept(); conn.sendall(value.encode()); conn.close()
"""
ASK = "import socket; print(socket.create_connection(('127.0.0.1', 9000)).recv(64).decode())"


def say(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def daemon(settings: Settings) -> Iterator[None]:
    """Use the running daemon, or start one for the duration of the demo."""
    with Client(settings=settings) as c:
        try:
            c.info()
            say(f"using the Ember daemon at {settings.socket_path}")
            yield
            return
        except ConnectError:
            pass
    say(f"starting the Ember daemon (data in {settings.data_dir}, socket {settings.socket_path})")
    log = open(settings.data_dir.parent / "ember-demo-daemon.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "ember", "serve"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited at start-up; see {log.name}")
            with Client(settings=settings) as c, contextlib.suppress(ConnectError):
                c.info()
                break
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not start in 120 s")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def timed(label: str, fn: Any, *args: Any) -> Any:
    start = time.perf_counter()
    result = fn(*args)
    say(f"  {label}: {(time.perf_counter() - start) * 1000:.0f} ms")
    return result


def run_demo() -> int:
    settings = Settings.from_env()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with daemon(settings), Client(settings=settings) as c:
            accel = c.info().accelerator
            say(f"accelerator: {accel.name} ({accel.reason})")
            if not accel.security_boundary:
                say(f"  WARNING: {accel.warning}")
            say("1. preparing the built-in image 'debian' (built once, then reused)")
            start = time.perf_counter()
            c.images.prepare("debian", on_progress=lambda msg: say(f"   {msg}"))
            say(f"  image ready: {(time.perf_counter() - start) * 1000:.0f} ms")
            say("2. launching a VM from the image's memory snapshot (no boot)")
            vm = timed("launch", c.vms.run, "debian")
            say(f"  VM {vm.id}")
            try:
                say("3. running code in it")
                out = timed("exec", lambda: vm.exec(["python3", "-c", "print(6 * 7)"]))
                say(f"  python3 -c 'print(6 * 7)' -> {out.stdout.decode().strip()}")
                vm.exec(["sh", "-c", f"nohup python3 -c '{HOLDER}' > /tmp/holder.out 2>&1 &"])
                time.sleep(1.0)
                before = vm.exec(["python3", "-c", ASK]).stdout.decode().strip()
                vm.files.write("/root/note.txt", b"written before suspend\n")
                say(f"  a guest process holds {before} in memory; /root/note.txt written")
                say("4. suspending (memory + devices + disk saved, VMM exits)")
                r = timed("suspend", vm.suspend)
                say(f"  state saved: {r.snapshot_bytes / 2**20:.1f} MiB; VM is {r.state}")
                say("5. resuming under the same id")
                timed("resume", vm.resume)
                after = vm.exec(["python3", "-c", ASK]).stdout.decode().strip()
                note = vm.exec(["cat", "/root/note.txt"]).stdout.decode().strip()
                say(f"  the same process answers {after}; /root/note.txt says: {note!r}")
                if after != before or note != "written before suspend":
                    say("FAILED: state did not survive suspend/resume")
                    return 1
                say("state survived suspend/resume")
                say("6. a second cycle: the VM now has its own RAM file; only state and changed pages are written")
                r = timed("suspend", vm.suspend)
                say(f"  written: {r.snapshot_bytes / 2**20:.1f} MiB; steps (ms): {dict(r.phases_ms)}")
                r = timed("resume", vm.resume)
                say(f"  steps (ms): {dict(r.phases_ms)}")
                again = vm.exec(["python3", "-c", ASK]).stdout.decode().strip()
                if again != before:
                    say("FAILED: state did not survive the second cycle")
                    return 1
                say(f"  the process still answers {again}")
            finally:
                vm.remove()
                say(f"7. removed {vm.id} and everything it used on the host")
    except EmberError as exc:
        say(f"FAILED: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_demo())
