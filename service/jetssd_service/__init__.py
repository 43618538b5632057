"""PFJet-SSD inference gateway: validates events, rasterizes them and routes them to a backend.

Layout per DESIGN §3; the implementation lands with the serving issue.
"""
