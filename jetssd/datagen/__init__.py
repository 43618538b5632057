"""Event generation: Pythia 8 RS-graviton and QCD events, min-bias pileup, a Delphes-like fast simulation.

Optional GPL extra (``pip install 'jetssd[datagen]'``): nothing outside this package and
:mod:`jetssd.baseline` imports Pythia or FastJet.
"""
