"""The documented launcher: ``accelerate launch kd_trainer/run.py RECIPE [key.sub=value ...]``.

Run as a file, Python puts ``kd_trainer/`` itself first on ``sys.path``, where the package's own
subpackages (``data``, ``models``, ``losses``, ``report``, ...) would shadow any top-level module of
the same name. So this file imports nothing of the project: it replaces its process with
``python -m kd_trainer`` (the same process id and environment, so the rank variables that
accelerate or torchrun set carry over), which imports the package by its name only. The run
itself is :mod:`kd_trainer.runner`.
"""

import os
import sys

if __name__ == "__main__":
    os.execv(sys.executable, [sys.executable, "-m", "kd_trainer", *sys.argv[1:]])
