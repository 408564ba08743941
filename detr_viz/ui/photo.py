"""Where the photo comes from: a drop zone from the first open, the camera, or the sample."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "coffee.jpg"
SAMPLE_NAME = "sample (coffee.jpg, CC0)"
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
        st.caption("Showing the sample photo until you drop one.")
        return SAMPLE.read_bytes(), SAMPLE_NAME
    return chosen.getvalue(), chosen.name
