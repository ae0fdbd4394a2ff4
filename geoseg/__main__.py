"""``python -m geoseg COMMAND ...`` (and ``torchrun -m geoseg predict|train ...``): the geoseg CLI."""

from __future__ import annotations


def main() -> None:
    """Run the ``geoseg`` command group with the command line's arguments."""
    from cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
