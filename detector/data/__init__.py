"""Data: `coco` (COCO-format dataset), `loader` (resumable training loader, eval loader),
`synth` (the deterministic synthetic default dataset).

Nothing is imported here on purpose: `ioulab data synth` needs only numpy and PIL, and importing
torch would double its run time.
"""
