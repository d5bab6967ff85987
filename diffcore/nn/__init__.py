"""Neural-network building blocks (the U-Net's config and layers). The public entry point is :mod:`diffcore.unet`."""
