"""Each view's pure work (maps, figure specs, click images), remembered per browser session.

A sidebar change reruns the whole page; the sections it does not affect (the encoder's maps for
a threshold move, say) then find their maps and figure specs here instead of computing them
again. Keys hold everything the result depends on (photo digest, variant, method, layer, head,
points, style), values are never modified after they are stored. The results live in the
page's byte-bounded cache (``resources.cache``) under this session's id, so they count against
the one memory budget and no session ever sees another's.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Hashable
from typing import TypeVar

import streamlit as st

from detr_viz.ui.resources import cache

T = TypeVar("T")


def memo(key: Hashable, build: Callable[[], T]) -> T:
    session = st.session_state.setdefault("_detr_viz_session", uuid.uuid4().hex)
    return cache().get(("memo", session, key), build)
