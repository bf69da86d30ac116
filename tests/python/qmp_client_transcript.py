#!/usr/bin/env python3
"""Drive a QMP server with qemu.qmp's async QMPClient and print a normalised transcript.

Usage: qmp_client_transcript.py SOCKET SCENARIO

SCENARIO is ``session`` (negotiation, query-status, stop/cont with the STOP and RESUME events
taken from the client's event listener, error replies raised as ExecuteError) or ``fds``
(``send_fd_scm`` ahead of getfd/closefd and add-fd/query-fdsets/remove-fd).

The same script runs against Bulkhead and against QEMU (monitor-proc/tests/python_clients.rs
compares the two transcripts). Each line is ``LABEL<TAB>JSON``. What differs between any two
servers by nature (version numbers, package string, fd numbers, timestamps) is printed as a
shape: strings become "", numbers 0, error classes are kept. Everything else is printed as
received. A step that fails in a way the script does not expect ends the script with a
traceback and a non-zero status.
"""

import asyncio
import json
import os
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient

EVENT_TIMEOUT = 5.0


def shape(value):
    """The value with strings emptied and numbers zeroed; error classes kept."""
    if isinstance(value, dict):
        return {k: (v if k == "class" else shape(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    if isinstance(value, str):
        return ""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return 0
    return value


def plain(message):
    """A qemu.qmp Message (or anything JSON-like) as plain JSON values."""
    return json.loads(json.dumps(message, default=dict))


def emit(label, value):
    """One transcript line."""
    print(f"{label}\t{json.dumps(value, sort_keys=False)}", flush=True)


async def execute(qmp, label, cmd, args=None, show=plain):
    """Run one command; print its return value (through `show`) or its error."""
    try:
        ret = await qmp.execute(cmd, args)
    except ExecuteError as err:
        emit(label, {"error": {"class": err.error_class, "desc": str(err)}})
        return None
    emit(label, show(ret))
    return ret


async def next_event(listener, label):
    """Wait for the next event the listener holds; print its name and shape."""
    event = plain(await asyncio.wait_for(listener.get(), EVENT_TIMEOUT))
    emit(label, {"event": event.get("event"), "shape": shape(event)})


async def session(qmp):
    """Negotiation, run state, events and error replies."""
    # The client parsed and type-checked the greeting; read it through its model.
    emit("greeting.version", shape(plain(qmp.greeting.QMP.version)))
    emit("greeting.capabilities", list(qmp.greeting.QMP.capabilities))
    await execute(qmp, "query-version", "query-version", show=shape)
    await execute(qmp, "query-status", "query-status")
    listener = EventListener(("STOP", "RESUME"))
    with qmp.listen(listener):
        await execute(qmp, "stop", "stop")
        await next_event(listener, "stop.event")
        await execute(qmp, "query-status.paused", "query-status")
        await execute(qmp, "cont", "cont")
        await next_event(listener, "cont.event")
        await execute(qmp, "query-status.running", "query-status")
        emit("events.left", listener.empty())
    await execute(qmp, "error.unknown-command", "no-such-command")
    await execute(qmp, "error.negotiate-again", "qmp_capabilities")
    await execute(qmp, "error.unexpected-argument", "query-status", {"verbose": True})
    await execute(qmp, "error.missing-argument", "closefd", {})
    await execute(qmp, "error.wrong-type", "human-monitor-command", {"command-line": 7})


def fdset_view(fdsets):
    """query-fdsets with the fd numbers (which are per process) zeroed."""
    return [
        {
            "fdset-id": s["fdset-id"],
            "fds": [dict(f, fd=0) for f in s["fds"]],
        }
        for s in fdsets
    ]


async def fds(qmp):
    """SCM_RIGHTS through send_fd_scm, consumed by getfd and add-fd."""
    rd, wr = os.pipe()
    try:
        qmp.send_fd_scm(rd)
        await execute(qmp, "getfd", "getfd", {"fdname": "pipe0"})
        qmp.send_fd_scm(wr)
        await execute(qmp, "getfd.same-name", "getfd", {"fdname": "pipe0"})
        await execute(qmp, "closefd", "closefd", {"fdname": "pipe0"})
        await execute(qmp, "closefd.again", "closefd", {"fdname": "pipe0"})
        await execute(qmp, "getfd.no-fd", "getfd", {"fdname": "pipe1"})

        qmp.send_fd_scm(rd)
        added = await execute(qmp, "add-fd", "add-fd", {"opaque": "read end"}, show=shape)
        if added is None:
            return  # the transcript shows the error; the rest needs the set
        fdset = added["fdset-id"]
        emit("add-fd.fdset-id", fdset)
        qmp.send_fd_scm(wr)
        second = await execute(qmp, "add-fd.same-set", "add-fd", {"fdset-id": fdset}, show=shape)
        if second is None:
            return
        emit("add-fd.same-set.fdset-id", second["fdset-id"])
        emit("add-fd.distinct-fds", second["fd"] != added["fd"])
        await execute(qmp, "query-fdsets", "query-fdsets", show=fdset_view)
        await execute(qmp, "remove-fd.one", "remove-fd", {"fdset-id": fdset, "fd": added["fd"]})
        await execute(qmp, "query-fdsets.after-one", "query-fdsets", show=fdset_view)
        await execute(qmp, "remove-fd.set", "remove-fd", {"fdset-id": fdset})
        await execute(qmp, "query-fdsets.empty", "query-fdsets", show=fdset_view)
        await execute(qmp, "remove-fd.unknown", "remove-fd", {"fdset-id": 77})
        await execute(qmp, "add-fd.no-fd", "add-fd", {})
    finally:
        os.close(rd)
        os.close(wr)


SCENARIOS = {"session": session, "fds": fds}


async def main(socket_path, scenario):
    """Connect (QMPClient negotiates), run the scenario, disconnect."""
    qmp = QMPClient("transcript")
    await qmp.connect(socket_path)
    emit("connected", qmp.runstate.name)
    try:
        await SCENARIOS[scenario](qmp)
    finally:
        await qmp.disconnect()
    emit("disconnected", qmp.runstate.name)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in SCENARIOS:
        sys.exit(f"usage: {sys.argv[0]} SOCKET {{{'|'.join(SCENARIOS)}}}")
    asyncio.run(main(sys.argv[1], sys.argv[2]))
