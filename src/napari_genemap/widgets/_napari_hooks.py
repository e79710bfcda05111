"""Calls from napari into a dock widget that never keep it alive: napari's events, mouse callbacks and key
bindings hold their callbacks strongly, so each goes through a weak reference and is undone on destroy."""

from __future__ import annotations

import weakref

import numpy as np


def weak_call(widget, method: str):
    """A callback that calls ``widget.method`` while the widget lives (napari's events hold it strongly)."""
    reference = weakref.ref(widget)

    def call(*args):
        target = reference()
        if target is not None:
            getattr(target, method)(*args)

    return call


def layer_undo(widget):
    """A layer key binding that undoes in ``widget`` while it lives (napari passes the layer)."""
    undo = weak_call(widget, "undo")
    return lambda _layer: undo()


def click_adder(widget):
    """A viewer mouse callback: a click (press and release without moving) adds a circle there."""
    reference = weakref.ref(widget)

    def on_mouse(viewer, event):
        target = reference()
        if target is None or not target._wants_click(event):
            return
        del target
        world, start = np.asarray(event.position), np.asarray(event.pos, dtype=float)
        yield
        moved = False
        while event.type == "mouse_move":
            moved = moved or np.linalg.norm(np.asarray(event.pos, dtype=float) - start) > 4
            yield
        target = reference()
        if target is not None and not moved:
            target._add_circle_at(world)

    return on_mouse


def cleanup(viewer, click_callback, layer_events, slots):
    """What to undo when the widget is destroyed (holds no reference to the widget itself)."""
    slots = [(signal, weakref.WeakMethod(slot)) for signal, slot in slots]

    def undo(*_):
        if click_callback in viewer.mouse_drag_callbacks:
            viewer.mouse_drag_callbacks.remove(click_callback)
        for emitter, callback in layer_events:
            emitter.disconnect(callback)
        for signal, slot in slots:
            method = slot()
            if method is not None:
                signal.disconnect(method, missing_ok=True)

    return undo
