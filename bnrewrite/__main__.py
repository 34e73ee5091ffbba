"""``python -m bnrewrite``: the same CLI as the ``bnrewrite`` command."""

from .cli import main

raise SystemExit(main())
