"""``python -m kseg ...``: see :mod:`kseg.app.cli`."""

from kseg.app.cli import main

raise SystemExit(main())
