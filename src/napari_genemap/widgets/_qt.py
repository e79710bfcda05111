"""Qt glue shared by the dock widgets: the session's polling timer and small helpers."""

from __future__ import annotations

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication, QLabel

from .session import Session, session_for

POLL_MS = 50  # how often the GUI thread picks up the tile service's messages


def connect_session(viewer) -> Session:
    """The viewer's session, polled on the GUI thread by one timer (started by the first widget)."""
    session = session_for(viewer)
    if session.timer is None:
        session.timer = QTimer()
        session.timer.setInterval(POLL_MS)
        session.timer.timeout.connect(session.poll)
        session.timer.start()
        QApplication.instance().aboutToQuit.connect(session.close)
    return session


def wrapped_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    return label
