"""Where the photo comes from: a drop zone from the first open, the camera, or the sample."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "coffee.jpg"
SAMPLE_NAME = "sample (coffee.jpg, CC0)"
REPLACED_WAIT = 0.3  # s: how long a run without the file it had waits for the next file's rerun
UPLOAD_TYPES = ["jpg", "jpeg", "jfif", "png", "webp", "heic", "heif", "avif", "bmp", "tif",
                "tiff", "gif"]


def choose_photo() -> tuple[bytes, str]:
    """The photo's bytes and a name: the camera shot if taken, else the dropped file, else the
    sample (shown until a photo is dropped)."""
    upload = st.file_uploader("Drop a phone photo here (JPEG, PNG, HEIC, WebP, AVIF, ...)",
                              type=UPLOAD_TYPES, key="upload")
    shot = None
    if st.toggle("Take a photo with the camera", key="use-camera"):
        shot = st.camera_input("Take a photo", key="camera")
    chosen = shot or upload
    if chosen is None:
        if st.session_state.pop("had-photo", False):
            # A file dropped over another arrives as two reruns: one without any file, then
            # one with the new file (its upload done). Waiting here lets the second stop this
            # one at its next element, before the sample is decoded and analysed beside the
            # new photo (Streamlit starts the new run at once); a removed file shows the sample
            # that much later.
            time.sleep(REPLACED_WAIT)
        st.caption("Showing the sample photo until you drop one.")
        return SAMPLE.read_bytes(), SAMPLE_NAME
    st.session_state["had-photo"] = True
    return chosen.getvalue(), chosen.name
