"""``python -m mixprec``: the same command line as the ``mixprec`` console script."""

from mixprec.cli import main

raise SystemExit(main())
