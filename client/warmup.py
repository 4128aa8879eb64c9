"""What a site's process can load ahead of the message that needs it, while it waits between messages."""

from __future__ import annotations

import importlib
import logging
import sys
import threading

from common.runconfig import RunConfig

log = logging.getLogger("flwr.radfed.client")

_TORCH_IMPORT: list[threading.Thread] = []  # the background import of torch, once per process


def prefetch_torch(run: RunConfig) -> None:
    """A FedAvg run trains in torch, whose import takes seconds once per process (3.5 s on this machine; the whole
    first train round waited for it): it starts in the background at the run's first messages (plan, features),
    while the site mostly waits for the coordinator and the other sites. Exact training never loads torch. If the
    import fails here, the train handler's own import raises the error as before."""
    if run.training != "fedavg" or _TORCH_IMPORT or "torch" in sys.modules:
        return
    thread = threading.Thread(target=_import_quietly, args=("common.model",), name="radfed-torch-import", daemon=True)
    _TORCH_IMPORT.append(thread)
    thread.start()


def _import_quietly(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  # the train handler imports it again and says what is wrong
        log.warning("torch could not be imported ahead of training (%s); the first train message will try again",
                    exc)
