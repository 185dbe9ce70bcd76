"""The VAE decoder of the samplers: ``racedit.vae`` (one loader, latents <-> images with scale and shift).

``vae_decoder(load_vae(name, device), scaling_factor)`` is the function ``generate(decode=...)`` takes; the
shift comes from the VAE's config unless given, so a VAE with a shift factor decodes correctly.
"""

from __future__ import annotations

from racedit.vae import VAEError, decoder, load_vae

vae_decoder = decoder

__all__ = ["VAEError", "load_vae", "vae_decoder"]
