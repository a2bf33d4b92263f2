"""The compendium's library: the notebooks call into it for all real work.

Modules (one concern each): ``paths``, ``results``, ``plots``, ``models``, ``world`` (the toy
world), ``datasets``, ``activations``, ``interventions``, ``probes``, ``sae``, ``toys``,
``softprompts``, ``run`` (the headless runner).  Import what you need, e.g.
``from lib.models import load_model``.
"""
__version__ = "0.1.0"
