"""The replicators `make bench` compares, each behind the ``Contender`` interface of ``base.py``."""
