"""Qt glue shared by the dock widgets: the session's polling timer and small helpers."""

from __future__ import annotations

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication, QFrame, QLabel, QScrollArea, QVBoxLayout, QWidget

from .session import Session, session_for

POLL_MS = 50  # how often the GUI thread picks up the tile service's messages


def connect_session(viewer) -> Session:
    """The viewer's session, polled on the GUI thread by one timer (started by the first widget); its
    errors (a failed tile service, a bad checkpoint) also reach napari's notifications, once."""
    session = session_for(viewer)
    if session.timer is None:
        session.timer = timer = QTimer()
        timer.setInterval(POLL_MS)
        timer.timeout.connect(session.poll)
        timer.start()
        session.error.connect(notify_error)
        app = QApplication.instance()
        assert app is not None  # widgets exist, so the application does
        app.aboutToQuit.connect(session.close)
    return session


def notify_error(message: str) -> None:
    """One line in napari's notifications (the panels also show it in their status line)."""
    from napari.utils.notifications import show_error

    show_error(f"napari-genemap: {message}")


def wrapped_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    return label


def scrolled_layout(widget: QWidget) -> QVBoxLayout:
    """A vertical layout for ``widget``'s contents inside a scroll area: a tall panel then scrolls instead
    of forcing its dock (and the tabs sharing it) taller than a 1080p screen."""
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    area = QScrollArea()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    inner = QWidget()
    area.setWidget(inner)
    outer.addWidget(area)
    return QVBoxLayout(inner)
