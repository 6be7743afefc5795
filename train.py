"""Train LeNet-5. With no options: the paper's configuration on MNIST (see README).

The same program is installed as ``lenet-train``; ``python train.py --help`` lists the options.
"""

import sys

from lenet_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
