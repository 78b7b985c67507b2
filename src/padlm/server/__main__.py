"""``python -m padlm.server [options]``: the same as ``padlm serve`` (used by bench serve)."""

import sys

from padlm.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
