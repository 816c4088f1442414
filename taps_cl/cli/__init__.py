"""The `taps-cl` command line."""
