"""The commands layer: one module per command, each with its parser, ``main(argv=None)`` and the
orchestration of one user task; ``python -m pillsnap_dali.<name>`` runs ``pillsnap_dali.commands.<name>.main``
through a thin entry point (``pillsnap_dali/<name>.py``).

``common`` holds what every command shares: the flag convention (``--stage --config --set --data-root --out
--name --device --resume``), the one flag-to-config mapping, logging setup and ``run_main`` (an expected error is
one ``error:`` line and exit 2). Arrows point down only: the commands import the library (``data``, ``loaders``,
``pipelines``, ``training``, ``bench``...), and no library module imports this package
(``tests/test_layers.py`` checks the import graph).
"""

COMMANDS = ("train", "manifest", "synth", "prepare", "detect", "predict", "evaluate", "export", "doctor",
            "bench", "gpu_check", "wheelhouse")
