"""What happens to a task in a registry: `adding` (one `task add`) and `grouping` (`group train`)
check the request (`requests`), plan it with the method (`planning`), train it and record it
(`recording`, with a heartbeat from `runs`); `rebuilding` gives back a task's model from its
hash-checked files, `verification` and `verify_pool` check them against their records and probe
batches (`probes`). This is the only part of the learner that talks to the registry."""
