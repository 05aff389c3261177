"""Tools around the models: benchmark, keep-rate sweep, visualisation, the ``timm-evit`` command line.

The models know nothing of them; the plain-model table the benchmarks compare with lives here too.
"""
