"""``ember shell``: this terminal, raw, connected to a terminal in a VM.

The local terminal goes raw (every key, Ctrl-C included, goes to the guest) and is restored on
the way out, whatever ends the session; a window size change (SIGWINCH) resizes the guest's
terminal. Without a local terminal (stdin a pipe) the input is sent as it is, and its end
leaves the session running until the command exits.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import sys
import termios
import tty
from collections.abc import Sequence

from ember.sdk.client import Client

TERM = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
READ_SIZE = 64 * 1024


def terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``, within what a guest terminal takes; 24x80 if none."""
    try:
        cols, rows = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return min(max(rows, 1), 1000) if rows else 24, min(max(cols, 1), 1000) if cols else 80


def term_name(value: str | None) -> str:
    return value if value and TERM.match(value) else "xterm-256color"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def run_shell(client: Client, vm_id: str, command: Sequence[str], *, user: str, cwd: str) -> int:
    """Run the session; returns the exit code for this process (the command's, 128+N for signal N)."""
    fd_in, fd_out = sys.stdin.fileno(), sys.stdout.fileno()
    size_fd = fd_out if os.isatty(fd_out) else fd_in
    rows, cols = terminal_size(size_fd)
    shell = client.vms.shell(vm_id, command, user=user, cwd=cwd, rows=rows, cols=cols,
                             term=term_name(os.environ.get("TERM")))  # fmt: skip
    saved = termios.tcgetattr(fd_in) if os.isatty(fd_in) else None
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def on_winch(_signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            os.write(wake_w, b"w")

    previous = signal.signal(signal.SIGWINCH, on_winch)
    try:
        if saved is not None:
            tty.setraw(fd_in, termios.TCSANOW)
        reading = True
        _write_all(fd_out, shell.take_held())  # a prompt (or the whole output) that came with the handshake
        while not shell.ended:
            ready, _, _ = select.select([shell, wake_r, *([fd_in] if reading else [])], [], [])
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)  # every pending wake-up at once (a size is all that matters)
                shell.resize(*terminal_size(size_fd))
            if fd_in in ready:
                data = os.read(fd_in, READ_SIZE)
                if data:
                    shell.send(data)
                else:
                    reading = False  # the input ended: the command decides when the session does
            if shell in ready:
                _write_all(fd_out, shell.pump())
    finally:
        if saved is not None:
            termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, previous)
        os.close(wake_r)
        os.close(wake_w)
        shell.close()
    if shell.exit_code is None:
        reason = f" ({shell.close_reason})" if shell.close_reason else ""
        print(f"ember: the shell closed without an exit status{reason}", file=sys.stderr)
        return 255
    return 128 + shell.signal if shell.signal else shell.exit_code
