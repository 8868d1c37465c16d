"""``python -m lorax_ref.conformance ...``: the same as ``python -m lorax_ref verify ...``."""
from .command import main

raise SystemExit(main())
