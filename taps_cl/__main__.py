"""`python -m taps_cl` runs the command line."""

from taps_cl.cli.app import main

main()
