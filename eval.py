"""Evaluate LeNet-5, predict digits in your own images, print its layer table, draw its figures.

The same program is installed as ``lenet-eval``; ``python eval.py --help`` lists the options.
"""

import sys

from lenet_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
