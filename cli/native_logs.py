"""TensorFlow's C++ start-up lines, kept off a person's terminal.

TensorFlow writes them (oneDNN, CUDA stubs, the CPU-feature notice) from C++ straight to file
descriptor 2 before any log level applies (absl's "before InitializeLog"), so neither
TF_CPP_MIN_LOG_LEVEL nor Python's logging can hold them back. The CLI routes fd 2 through a
pipe whose reader drops exactly those lines and passes everything else on; ``mnist -v`` keeps
them. The reader is drained at exit, so an error's last line is never lost.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

NATIVE_LINE = re.compile(rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w./-]+:\d+\] "
                         rb"|WARNING: All log messages before absl::InitializeLog\(\) is called"
                         rb"|To enable the following instructions: .* rebuild TensorFlow)")


def pump(source: int, sink: int) -> None:
    pending = b""
    while chunk := os.read(source, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not NATIVE_LINE.match(line))
        if kept:
            os.write(sink, kept)
    if pending and not NATIVE_LINE.match(pending):
        os.write(sink, pending)
    os.close(source)


def hold_back_native_logs() -> None:
    """From here on, fd 2 drops TensorFlow's C++ log lines and passes the rest."""
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    reader = threading.Thread(target=pump, args=(read_end, terminal), name="native-log-filter", daemon=True)
    reader.start()

    def drain() -> None:
        sys.stderr.flush()
        os.dup2(terminal, 2)  # the pipe's last writer in this process closes: the reader sees its end
        reader.join(timeout=2.0)  # a child that inherited the pipe may keep it open: do not wait on it

    atexit.register(drain)
