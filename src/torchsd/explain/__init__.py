"""See inside a generation: ``torchsd explain`` (``trace`` captures, ``report`` draws) and the 2-D ``toy`` model.

Only ``report`` and ``toy_report`` import matplotlib (the ``explain`` extra).
"""
