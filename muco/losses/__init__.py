"""Contrastive losses and the gradient-carrying gather."""
