"""Ablation reports read back from MLflow (`ioulab report`, `ioulab compare`); never imports Ray.

    runs.py     find a sweep's parent run and its trials (the MLflow naming contract)
    table.py    variants, baseline, the papers' table with its Improvement row, NMS and λ views
    intervals.py  paired-bootstrap intervals of the Δ columns from the runs' eval_matches.npz
    charts.py   matplotlib figures (AP against λ, AP per IoU threshold, ΔAP with intervals)
    render.py   report.md and the self-contained report.html
    command.py  `ioulab report SWEEP`
    compare.py  `ioulab compare RUN_ID ...`
"""
