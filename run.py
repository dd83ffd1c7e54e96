"""The seed's entry point: `python run.py` runs the server with the settings from `.env`."""

import sys

from crogia.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
