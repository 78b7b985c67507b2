"""Options that several commands share, declared once so their help and defaults agree."""

from __future__ import annotations

from typing import Annotated

import typer

ModelOption = Annotated[str, typer.Option(help="'default', a HF model id or a directory.")]
PersRMOption = Annotated[str, typer.Option(help="PersRM directory, 'default' or 'identity'.")]
PlacementOption = Annotated[str, typer.Option(
    help="Where the preference goes: system | user-prefix | bracket.")]
DtypeOption = Annotated[str, typer.Option(help="float32 | bfloat16")]
