"""`python -m klgrade` runs the command-line interface."""

from klgrade.cli import main

main()
