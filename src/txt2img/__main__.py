"""``python -m txt2img``: the command-line interface."""

from txt2img.cli import main

raise SystemExit(main())
