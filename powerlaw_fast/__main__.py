"""``python -m powerlaw_fast {demo, reproduce, plot}``: see :mod:`powerlaw_fast.cli`."""

from powerlaw_fast.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
