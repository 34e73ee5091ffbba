"""Applications built on the library, kept apart from it (as torchao keeps benchmarks and
tutorials out of its package): the main job (:mod:`.demo`), per-layer diagnostics
(:mod:`.diagnose`), the benchmark table (:mod:`.bench`), and what they need -- embedded real data
(:mod:`.datasets`), a small ResNet (:mod:`.models`) and a ResNet-50 (:mod:`.resnet50`).

Nothing in the library imports this package; the command line (:mod:`bnrewrite.cli`) loads the
module of the subcommand being run.
"""

__all__: list[str] = []
