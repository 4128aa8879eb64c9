"""Imported by each Python worker of a run's own Ray cluster as it starts (``launch.ACTOR_PRELOAD``): radfed's
ClientApp module, so a ClientApp actor does not import it on its first message (a gated run's actors boot while the
ServerApp waits at START_GATE; the demo's own workers get it from radfed.process_backend's forkserver). Code only:
an actor knows no site before a message names one, so nothing is read or sent here. Best effort: whatever fails
here fails again, and is reported, where the first message imports it."""

import contextlib

with contextlib.suppress(Exception):  # Ray's preload would end the worker on anything but an ImportError
    import client.app  # noqa: F401
