"""Fixed-point emulation of PFJet-SSD on a CEVA SensPro DSP (contract: ``docs/dsp.md``).

``program``: the versioned program file; ``arith``: requantisation and the other integer primitives;
``compile``: TWN checkpoint → program (needs torch); ``reference`` / ``fast``: two bit-exact executors (numpy
only); ``detector``: fast executor + the shared post-processing; ``latency``: SP1000 cycle model.
"""
