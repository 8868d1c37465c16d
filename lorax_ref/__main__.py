"""``python -m lorax_ref`` — see :mod:`lorax_ref.cli`."""
from .cli import main

raise SystemExit(main())
