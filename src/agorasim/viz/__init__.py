"""The live dashboard (``agorasim dashboard``): Mesa's SolaraViz over the market or a run folder.

Needs the ``viz`` extra (solara, altair, matplotlib); ``agorasim.viz.server`` imports it lazily.
"""

import os

os.environ.setdefault("SOLARA_CHECK_HOOKS", "off")  # mesa 3.3's ComponentsView trips solara's hook linter
os.environ.setdefault("SOLARA_TELEMETRY_MIXPANEL_ENABLE", "false")  # a local tool reports nothing
