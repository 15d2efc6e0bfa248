"""Measuring sharpness: the library behind ``saf_jax.tools.analyze``.

- ``sharpness``: SAM sharpness (Du et al. Eq. 3-4), Hessian eigenvalues (Lanczos) and trace
  (Hutchinson).
- ``landscape``: filter-normalised directions and loss surfaces (Li et al., 2018).
- ``plots``: per-epoch curves, landscapes and comparison figures (matplotlib).
- ``runs``: a trained workdir's checkpoint loaded (``load_run``, config upgraded), and the
  analyze tool's measurements of it (sharpness, Hessian, landscape, curves).
"""
