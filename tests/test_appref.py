"""Flower's simulation pickles the function that loads the ClientApp, and with it the app, once per message (Ray
task arguments): radfed's app travels as a reference to ``client.app:app`` (client.appref), not as its handlers'
mod closures by value."""

from __future__ import annotations

import pickle

import pytest
from ray import cloudpickle

from client import appref
from client.app import app


def test_the_client_app_ships_by_reference_and_arrives_as_the_same_app():
    def load():  # as Flower's simulation wraps a loaded ClientApp (vce_api.start_vce: a local closure)
        return app

    shipped = cloudpickle.dumps(load)
    assert len(shipped) < 2000  # by value, its 21 handlers' mod closures were ~19 KB (5 to 16 ms per message)
    assert pickle.loads(shipped)() is app
    assert set(pickle.loads(shipped)()._registered_funcs) == set(app._registered_funcs)


def test_a_reference_to_something_else_is_refused():
    with pytest.raises(TypeError, match="is not the ClientApp"):
        appref.load("client.guard:privacy_guard")
