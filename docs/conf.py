"""Sphinx configuration of autocnnp's site (``make docs``). The reference pages are generated from the code by
``_ext/autocnnp_reference.py``."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "_ext"), str(HERE.parent)]  # the extension, and this checkout's autocnnp

project = "autocnnp"
author = "autocnnp contributors"
copyright = "autocnnp contributors"
extensions = ["sphinx.ext.autodoc", "autocnnp_reference"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {"description": "XML job files to distributed CNN segmentation training", "fixed_sidebar": True}
html_sidebars = {"**": ["about.html", "navigation.html", "searchbox.html"]}
html_static_path: list[str] = []
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the signatures say enough; torch and TensorFlow types are strings here
nitpicky = False
