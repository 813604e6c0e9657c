"""python -m lm.checkpoint: see lm.checkpoint.cli."""

from lm.checkpoint.cli import main

raise SystemExit(main())
