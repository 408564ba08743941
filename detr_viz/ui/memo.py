"""The last few results of each view's pure work, per browser session.

A sidebar change reruns the whole page; the sections it does not affect (the encoder's maps for
a threshold move, say) then find their maps and figure specs here instead of computing them
again. Keys hold everything the result depends on (photo digest, variant, method, layer, head,
points, style), values are never modified after they are stored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

import streamlit as st

T = TypeVar("T")
SIZE = 48  # results kept per session (a DC5 decoder grid spec is ~0.3 MB)


def memo(key: Hashable, build: Callable[[], T]) -> T:
    store: OrderedDict = st.session_state.setdefault("_detr_viz_memo", OrderedDict())
    if key in store:
        store.move_to_end(key)
        return store[key]
    value = store[key] = build()
    while len(store) > SIZE:
        store.popitem(last=False)
    return value
