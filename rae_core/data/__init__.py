"""Datasets: image folders (ImageNet layout), the shipped digits, latent shards."""
