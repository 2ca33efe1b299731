"""Collection of the package's doctests: skip the optional integrations whose extra is missing."""

from importlib.util import find_spec

# secorder/laplace.py imports laplace-torch (the optional extra secorder[laplace]).
collect_ignore = [] if find_spec("laplace") is not None else ["secorder/laplace.py"]
