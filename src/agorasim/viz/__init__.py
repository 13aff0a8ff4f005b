"""The live dashboard (``agorasim dashboard``): Mesa's SolaraViz over the market or a run folder.

Needs the ``viz`` extra (solara, altair, matplotlib); ``agorasim.viz.server`` imports it lazily.
"""
