"""``python -m radfed.cli``: the same as the ``radfed`` command."""

from radfed.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
