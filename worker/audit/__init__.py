"""Audit: how good the scores are on a site's own women.

Biopsy outcomes imported and matched, metrics (AUC, rates at operating points) with
patient-bootstrap intervals, the report as text, JSON, plots and HTML with heatmap overlays,
site operating points calibrated from outcomes, and the fitness verdict. It may import
``results``, ``scoring``, ``imaging`` and ``records``.
"""
