"""``python -m geoseg.train`` / ``torchrun -m geoseg.train``: the ``geoseg train`` command as a module.

This is an entry point, like cli.py: it hands its arguments to the click
command so that both accept exactly the same options.
"""

from __future__ import annotations

import sys
from typing import Sequence

#: Options of the ``geoseg`` group that may come before the train options.
_GROUP_FLAGS = ("-v", "-vv", "-vvv", "--verbose")


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``geoseg train`` with ``argv`` (default: the command line)."""
    from cli import cli, sigterm_as_interrupt

    args = list(sys.argv[1:] if argv is None else argv)
    group = [a for a in args if a in _GROUP_FLAGS]
    rest = [a for a in args if a not in _GROUP_FLAGS]
    with sigterm_as_interrupt():  # as the geoseg command: SIGTERM cleans up like Ctrl-C
        cli.main(args=[*group, "train", *rest], prog_name="geoseg")


if __name__ == "__main__":
    main()
