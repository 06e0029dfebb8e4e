"""Entry points: ``python -m train.main`` (the Noisy Machines recipe), ``python -m train.reproduce_mnist``."""
