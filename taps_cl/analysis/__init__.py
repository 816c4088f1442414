"""What the registry's numbers say: the report dataclasses (budget, accuracy matrix, layer map,
similarity) and their plots, and task similarity from gradient signatures (`similarity`). The
command line, the Python API and any other view take their figures from here."""
