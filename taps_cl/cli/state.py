"""Whether this invocation of the command line debugs: main() reads it to show tracebacks."""

from __future__ import annotations

# Set by the root command so that main() knows whether to show tracebacks.
STATE = {"debug": False}
