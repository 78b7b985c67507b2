"""``python -m padlm``: the same CLI as the ``padlm`` script (for machines without it)."""

from padlm.cli import main

main()
