"""python -m ember: the CLI."""

from ember.cli import main

main()
