"""What a user runs: ``sample.sample`` (the front door, ``diffcore.sample``), ``restore.restore`` (DPS and its
baseline on degraded images, with ``restore.write_restoration``) and ``evaluate.evaluate_model``
(FID/KID/precision/recall and bits/dim). The ``diffcore`` command line (:mod:`diffcore.cli`) is a thin layer over
these. The package imports nothing itself, so ``diffcore.pipelines.sample`` etc. always name the modules."""
