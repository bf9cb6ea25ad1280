"""`python -m autolabel`: the same as the `autolabel` command."""

from autolabel.cli import main

main()
