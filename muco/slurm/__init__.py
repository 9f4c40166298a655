"""Slurm submission of `muco fit` runs (`muco slurm submit`)."""
