"""The page's views (Streamlit): the only package besides ``app.py`` that imports streamlit.

``app.py`` is the table of contents; each module here draws one part of the page from the
library's records: :mod:`.sidebar`, :mod:`.photo`, :mod:`.decoder`, :mod:`.encoder`,
:mod:`.overview`, :mod:`.scores`, :mod:`.compare`, :mod:`.downloads`; :mod:`.resources` holds
what is cached across reruns (models, analyses, explanation maps). Nothing in ``detr_viz``
outside this package imports it.
"""
