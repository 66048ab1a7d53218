"""``python -m impflow``: the ``impflow`` command."""

from .cli import main

raise SystemExit(main())
