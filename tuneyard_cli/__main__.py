"""`python -m tuneyard_cli …` is the `tuneyard` command."""

from tuneyard_cli.server import main

raise SystemExit(main())
