"""``python -m poeem`` (and ``torchrun -m poeem``) runs the command line."""

from poeem.cli import main

main()
