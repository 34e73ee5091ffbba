"""Graph passes of bnrewrite, installed as ``bnrewrite.passes``.

Each pass lowers the estimators of :mod:`bnrewrite.estimators` into a graph form; none re-derives the
math. See ``README.md`` in this folder for the invariants the passes keep.
"""

__all__: list[str] = []
