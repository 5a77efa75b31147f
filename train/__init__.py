"""The torch side: the eps-UNet, its trainer, datasets, checkpoints, model sources and the eager reference sampler."""

from train.torch_compat import make_torchvision_importable

make_torchvision_importable()
