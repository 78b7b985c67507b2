"""``python -m padlm``: the same CLI as the ``padlm`` script (for machines without it).

Guarded: vLLM's engine core is a spawned process that re-imports the entry module."""

from padlm.cli import main

if __name__ == "__main__":
    main()
