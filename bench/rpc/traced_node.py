"""``forge-node start`` counting the Python bytecode instructions each function runs (sys.settrace with
opcode events), switched on and off by SIGHUP; the counts go to ``opcodes.json`` in the working
directory. With forge-observe it also takes observed_node.py's SIGUSR1 aggregation."""
import collections
import json
import os
import signal
import sys
from pathlib import Path

if os.environ.get("FORGE_DISABLE_PLUGINS") != "observe":
    import observed_node  # noqa: F401  (its lifespan patch)

from forge_kernel.cli import main

ops: collections.Counter = collections.Counter()
calls: collections.Counter = collections.Counter()
on = False


def tracer(frame, event, arg):
    code = frame.f_code
    key = f"{code.co_filename}:{code.co_firstlineno}:{code.co_name}"
    if event == "call":
        calls[key] += 1
        frame.f_trace_opcodes = True
        return local
    return None


def local(frame, event, arg):
    if event == "opcode":
        code = frame.f_code
        ops[f"{code.co_filename}:{code.co_firstlineno}:{code.co_name}"] += 1
    return local


def toggle(signum, frame):
    global on
    if not on:
        ops.clear()
        calls.clear()
        on = True
        sys.settrace(tracer)
    else:
        sys.settrace(None)
        on = False
        Path("opcodes.json").write_text(json.dumps({"ops": ops, "calls": calls}))


signal.signal(signal.SIGHUP, toggle)

if __name__ == "__main__":
    sys.exit(main())
