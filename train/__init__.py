"""Training side of ddpm-deploy: the eps-UNet, datasets, trainer, checkpoints and the eager reference sampler."""
