"""What this invocation of the command line was given: its arguments and whether to debug."""

from __future__ import annotations

# Set by the root command so that main() knows whether to show tracebacks.
STATE = {"debug": False}
# The arguments main() runs, which `task add --nproc N` hands on to the processes it starts.
ARGS: list[str] = []
