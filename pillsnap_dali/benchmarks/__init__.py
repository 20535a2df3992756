"""The measuring code behind ``python -m pillsnap_dali.bench`` (the command: ``pillsnap_dali.commands.bench``):
``decode`` (the loaders and their peers), ``step`` (model-only ceiling), ``scan``, ``epochs`` (memory over epochs),
``ops`` (CPU cost op by op), ``loaders`` (the timed epoch), ``peers`` (OpenCV, torchvision, PIL draft arms).

Importing this package loads nothing heavy: each module imports what it measures."""
