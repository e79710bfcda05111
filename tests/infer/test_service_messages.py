"""The tile service's typed messages as callers see them, and the package's log level setting."""

from __future__ import annotations

import logging
import pickle

import pytest

from napari_genemap.infer.service import Aggregated, Failed, Ready, ServiceEvent, TilesDone, Want
from napari_genemap.log import log_level


def test_typed_events_become_the_payloads_the_widgets_read():
    assert ServiceEvent.of(Ready("/c.zarr", ["A"], "cpu", "openvino")) == ServiceEvent(
        "ready", {"cache": "/c.zarr", "genes": ["A"], "device": "cpu", "backend": "openvino"}
    )
    tiles = ServiceEvent.of(TilesDone(((0, 1, 2),), queued=3, paused=False, total=4, eta_s=None))
    assert tiles == ServiceEvent(
        "tiles", {"done": [(0, 1, 2)], "queued": 3, "paused": False, "total": 4, "eta_s": None}
    )
    assert ServiceEvent.of(Aggregated(7, table=None)).payload == {"request": 7, "table": None}
    assert ServiceEvent.of(Aggregated(7, error="bad")).payload == {"request": 7, "error": "bad"}
    assert ServiceEvent.of(Failed("broken")).payload == {"message": "broken"}
    assert ServiceEvent.of(Failed("broken", "Traceback ...")).payload == {
        "message": "broken",
        "traceback": "Traceback ...",
    }
    with pytest.raises(TypeError):
        ServiceEvent.of(Want(()))


def test_messages_survive_the_socket():
    message = Want(((0, 0, 0), (1, 0, 1)))
    assert pickle.loads(pickle.dumps(message)) == message


@pytest.mark.parametrize(
    ("value", "level"), [(None, logging.WARNING), ("debug", logging.DEBUG), ("15", 15), ("loud", logging.WARNING)]
)
def test_log_level_from_the_environment(monkeypatch, value, level):
    if value is None:
        monkeypatch.delenv("GENEMAP_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("GENEMAP_LOG_LEVEL", value)
    assert log_level() == level
