"""The ``geoseg`` command line: parse options, call one library function each.

This is the only module that knows click, prints, or exits. Heavy imports
(torch, rasterio, geopandas) happen inside command bodies so that
``geoseg --help`` answers at once.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from geoseg import __version__


class GeosegGroup(click.Group):
    """A click group that turns GeosegError into a one-line message and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        from geoseg.errors import GeosegError

        try:
            return super().invoke(ctx)
        except GeosegError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; no output was written") from None


@click.group(cls=GeosegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Find rooftops in georeferenced aerial and satellite imagery."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="geoseg")


if __name__ == "__main__":
    sys.exit(main())
