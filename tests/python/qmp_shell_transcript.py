#!/usr/bin/env python3
"""Drive a QMP server with qemu.qmp's ``qmp-shell`` through its stdin; print a transcript.

Usage: qmp_shell_transcript.py SOCKET

Runs the ``qmp-shell`` console script installed next to this interpreter (the venv made by
tests/python/setup.sh) on SOCKET, feeds it the COMMANDS below, one per line, and prints what it
answered to each as ``LABEL<TAB>JSON`` lines: ``banner``, then ``shell[i] <command>`` per
command (a JSON answer as its value, other output as text), then ``stderr`` and ``exit``.
qmp-shell prints its prompt ``(QEMU) `` before reading each line, so its output cut at the
prompts gives one answer per command. Digits of the version in the banner and of event
timestamps are replaced by ``N``. HOME points at a scratch directory so the shell's history
file does not land in the user's home.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

PROMPT = "(QEMU) "
# An empty line makes qmp-shell print the events it has received.
COMMANDS = [
    "query-status",
    "stop",
    "",
    "query-status",
    "no-such-command",
    "query-status verbose=true",
    "cont",
    "",
    "query-status",
]


def emit(label, value):
    """One transcript line."""
    print(f"{label}\t{json.dumps(value)}", flush=True)


def mask(text):
    """Version numbers and timestamps replaced by N."""
    text = re.sub(r"(Connected to QEMU )[0-9.]+", r"\1N.N.N", text)
    return re.sub(r"('(?:seconds|microseconds)': )[0-9]+", r"\1N", text)


def parsed(answer):
    """A JSON answer as its value, anything else (events, errors of the shell) as text."""
    try:
        return json.loads(answer)
    except ValueError:
        return answer.strip()


def main(socket_path):
    """Run the shell once over all COMMANDS and print its answers."""
    shell = os.path.join(os.path.dirname(sys.executable), "qmp-shell")
    with tempfile.TemporaryDirectory(prefix="qmp-shell-home-") as home:
        proc = subprocess.run(
            [shell, socket_path],
            input="".join(c + "\n" for c in COMMANDS),
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, HOME=home),
            check=False,
        )
    chunks = mask(proc.stdout).split(PROMPT)
    emit("banner", chunks[0].strip())
    # One chunk per command, then what follows the last prompt (the newline printed at EOF).
    answers = chunks[1:]
    for i, command in enumerate(COMMANDS):
        emit(f"shell[{i}] {command}", parsed(answers[i]) if i < len(answers) else None)
    emit("after last command", [a.strip() for a in answers[len(COMMANDS):]])
    emit("stderr", mask(proc.stderr).strip())
    emit("exit", proc.returncode)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SOCKET")
    main(sys.argv[1])
