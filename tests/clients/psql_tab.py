"""Types into psql through a terminal, as a user does, and prints what psql echoed after
each input (one line per input, control characters dropped): psql's tab completion asks
the server's catalog for names when it sees a Tab.

argv: conninfo, then the inputs (each typed as is, then cleared with Ctrl-C).
"""

import os
import pty
import re
import select
import sys
import time


def read(fd, seconds):
    """What the terminal shows within `seconds`, returning early once it is quiet."""
    out = b""
    deadline = time.time() + seconds
    quiet_since = time.time()
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            out += chunk
            quiet_since = time.time()
        elif out and time.time() - quiet_since > 0.5:
            break
    return out.decode(errors="replace")


def main():
    conninfo, inputs = sys.argv[1], sys.argv[2:]
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update({"TERM": "dumb", "PSQL_HISTORY": "/dev/null", "PGCONNECT_TIMEOUT": "10"})
        os.execvp("psql", ["psql", "-X", conninfo])
    banner = read(fd, 15)
    if "=#" not in banner and "=>" not in banner:
        sys.exit(f"no psql prompt: {banner!r}")
    for text in inputs:
        os.write(fd, text.encode())
        shown = read(fd, 10)
        print(re.sub(r"[\x00-\x1f]+", " ", shown))
        os.write(fd, b"\x03")
        read(fd, 2)
    os.write(fd, b"\\q\n")
    read(fd, 2)
    os.waitpid(pid, 0)


main()
