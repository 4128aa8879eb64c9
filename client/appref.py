"""radfed's ClientApp as Flower's simulation ships it: by reference to where it is defined, not by value.

Flower's simulation hands every message to a Ray actor with the function that loads the ClientApp
(flwr/server/superlink/fleet/vce/backend/raybackend.py, ``a.run.remote(self.app_fn, message, cid, context)``), and
that function holds the ClientApp object itself, so Ray pickles the whole app once per message. Flower wraps each
registered handler in its mods as nested closures (flwr/client/mod/utils.py ``make_ffn``), which pickle by value:
radfed's 21 handlers behind 6 mods were 19 KB and about 5 to 16 ms per message (idle to busy machine) to pickle,
and more to rebuild in the actor; a ClientApp without mods pickles in well under 1 ms. By reference, the actor
imports the module (as it already does for every handler it runs) and takes the same app from it.
"""

from __future__ import annotations

import importlib
from typing import Any

from client.batch import BatchingClientApp


class ReferencedClientApp(BatchingClientApp):
    """A BatchingClientApp that pickles as ``module:attribute``, where it is defined (the module must define it)."""

    def __init__(self, where: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._where = where

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return load, (self._where,)


def load(where: str) -> ReferencedClientApp:
    """The app ``module:attribute`` names (imported if it is not yet)."""
    module, _, name = where.partition(":")
    app = getattr(importlib.import_module(module), name)
    if not isinstance(app, ReferencedClientApp) or app._where != where:
        raise TypeError(f"{where} is not the ClientApp it was shipped as")
    return app
