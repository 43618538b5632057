"""Fixed-point emulation of PFJet-SSD on a CEVA SensPro DSP (contract: ``docs/dsp.md``).

``program``: the versioned program file; ``arith``: requantisation and the other integer primitives;
``compile``: TWN checkpoint → program (needs torch); ``reference`` / ``fast``: two bit-exact executors (numpy
only); ``detector``: fast executor + the shared post-processing; ``latency``: SP1000 cycle model.
"""

DEFAULT_PERCENTILE = 99.999
"""Calibration default: an activation channel's range is this percentile of |x| over the calibration events
(``docs/dsp.md`` §5.2 gives the AP of the alternatives that were measured)."""
