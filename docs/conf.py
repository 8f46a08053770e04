"""Sphinx configuration: the API reference from the docstrings, the README's tour, the notebooks.

Build (as .ci/run does, warnings are errors): ``sphinx-build -W -b html docs docs/_build``.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("KERAS_BACKEND", "jax")

import rmsprop_jax

project = "rmsprop_jax"
author = "the rmsprop_jax developers"
release = rmsprop_jax.__version__
copyright = "the rmsprop_jax developers, Apache-2.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style Args / Returns / Example sections
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "myst_nb",  # Markdown pages and the notebooks (rendered as stored, not executed)
]
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "README.md"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
intersphinx_mapping = {}
html_theme = "alabaster"
suppress_warnings = ["myst.header"]
