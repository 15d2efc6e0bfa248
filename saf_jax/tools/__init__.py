"""saf_jax's command-line programs, each run as ``python -m saf_jax.tools.<name>``.

- ``analyze``: SAM sharpness, Hessian eigenvalues and trace, loss landscapes and curves of
  trained workdirs.
- ``benchmark``: images/s of each method, as ratios to SGD within one run.
- ``compare``: methods × seeds through ``main.py``, with mean ± std and Welch intervals.
- ``table_report``: SAF table bytes by layout, and the top-k error on a run's logits.
- ``prepare_data``: prepares a TFDS dataset once, before training.

Each owns its flags and defines them only when it runs as a program, so that importing
several tools in one process (tests, notebooks) never defines a flag twice.
"""
